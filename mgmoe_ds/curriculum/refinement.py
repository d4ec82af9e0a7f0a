"""k-means clusters refined by each point's nearest neighbours, and cluster purity against labels.

``curriculum.clustering = "kmeans+knn"``: after k-means, each training image takes the cluster
most of its k nearest other images were given, and an image whose neighbours agree too little
is an outlier (left out of the centroids). Pure functions of tensors; the trainer gathers every
rank's features first (``train/passes.py``). The search is exact: faiss's flat index when faiss
is installed, else a torch search one block of query rows at a time, whose memory is a block x N
distance matrix, never the N x N one.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over all ranks (identity in one process)
BLOCK_DISTANCES = 1 << 24  # distances one block of the torch search holds (64 MB in float32)


def _identity(t: Tensor) -> Tensor:
    return t


def _faiss() -> Optional[object]:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def torch_neighbours(queries: Tensor, database: Tensor, k: int, *, exclude_self: bool = False, query_offset: int = 0,
                     block_rows: Optional[int] = None) -> Tensor:
    """Exact k nearest neighbours by Euclidean distance, one block of queries at a time.

    Arguments as :func:`nearest_neighbours`; ``block_rows`` query rows per block (None: as many as
    keep a block under ``BLOCK_DISTANCES`` distances).
    """
    m, n = queries.shape[0], database.shape[0]
    block = block_rows or max(1, BLOCK_DISTANCES // max(1, n))
    found = []
    for start in range(0, m, block):
        rows = queries[start:start + block]  # (b, D)
        distances = torch.cdist(rows, database)  # (b, N) Euclidean: the same order as squared
        if exclude_self:
            own = torch.arange(rows.shape[0], device=rows.device)  # (b,)
            distances[own, own + query_offset + start] = float("inf")
        found.append(torch.topk(distances, k, dim=1, largest=False).indices)  # (b, k) nearest first
    return torch.cat(found) if found else torch.zeros(0, k, dtype=torch.long, device=queries.device)


def faiss_neighbours(queries: Tensor, database: Tensor, k: int, *, exclude_self: bool = False,
                     query_offset: int = 0) -> Tensor:
    """:func:`nearest_neighbours` through faiss's exact flat index (float32 on the CPU, as many
    threads as torch uses)."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())  # several ranks on one machine: no oversubscription
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(database.detach().float().cpu().contiguous().numpy())
    wanted = k + int(exclude_self)
    _, found = index.search(queries.detach().float().cpu().contiguous().numpy(), wanted)  # (M, wanted) nearest first
    found = torch.from_numpy(found).to(queries.device)  # (M, wanted)
    if exclude_self:
        own = query_offset + torch.arange(found.shape[0], device=found.device)  # (M,)
        others = found != own[:, None]  # (M, k + 1)
        # a row whose own point did not come back (duplicates at distance 0) drops its farthest one instead
        keep = others & (others.long().cumsum(1) <= k)  # (M, k + 1), exactly k per row
        found = found[keep].view(-1, k)  # (M, k)
    return found


def nearest_neighbours(queries: Tensor, database: Tensor, k: int, *, exclude_self: bool = False,
                       query_offset: int = 0) -> Tensor:
    """The k nearest rows of ``database`` to each query (exact, squared Euclidean), nearest first.

    faiss's flat index when ``import faiss`` works, else :func:`torch_neighbours` on the inputs'
    device; both are exact, so they differ only in how equal distances are ordered.

    Args:
        queries: (M, D).
        database: (N, D).
        k: neighbours per query, at most N (N - 1 with ``exclude_self``).
        exclude_self: the queries are rows ``query_offset ... query_offset + M - 1`` of
            ``database``, and a query is not its own neighbour.
        query_offset: see ``exclude_self``.

    Returns:
        (M, k) database row indices (int64) on the queries' device.
    """
    available = database.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"nearest_neighbours: k = {k}, expected 1 to {available} (database of "
                         f"{database.shape[0]} rows{', a query not its own neighbour' if exclude_self else ''})")
    if _faiss() is not None:
        return faiss_neighbours(queries, database, k, exclude_self=exclude_self, query_offset=query_offset)
    return torch_neighbours(queries, database, k, exclude_self=exclude_self, query_offset=query_offset)


def knn_refine(features: Tensor, assignment: Tensor, num_clusters: int, k: int, agreement: float, *,
               rows: Optional[range] = None) -> tuple[Tensor, Tensor]:
    """Each point's cluster by the majority of its k nearest other points' (k-means) clusters.

    One pass: the votes are the neighbours' k-means clusters, not their refined ones. A tie
    between clusters goes to the point's own k-means cluster when it is among them, else to the
    lowest cluster id. A point is an outlier when the majority holds less than ``agreement`` of
    its votes. With fewer than k other points, all of them vote; a lone point keeps its cluster.

    Args:
        features: (N, D) every point (all ranks' images, in rank order).
        assignment: (N,) each point's k-means cluster.
        num_clusters: C.
        k: neighbours that vote (``curriculum.knn_neighbours``).
        agreement: the smallest share of votes a point's majority needs for the point not to be an
            outlier (``curriculum.knn_agreement``).
        rows: refine only these points (a rank's own); None: all of them.

    Returns:
        ``(refined, outlier)``: (R,) int64 clusters and (R,) bool, for the R points of ``rows``.
    """
    rows = range(features.shape[0]) if rows is None else rows
    own = assignment[rows.start:rows.stop]  # (R,)
    k = min(k, features.shape[0] - 1)
    if k < 1 or len(rows) == 0:
        return own.clone(), torch.zeros_like(own, dtype=torch.bool)
    neighbours = nearest_neighbours(features[rows.start:rows.stop], features, k, exclude_self=True,
                                    query_offset=rows.start)  # (R, k)
    votes = assignment.to(neighbours.device)[neighbours]  # (R, k) the neighbours' clusters
    counts = torch.zeros(len(rows), num_clusters, device=votes.device).scatter_add_(
        1, votes, torch.ones_like(votes, dtype=torch.float))  # (R, C)
    most = counts.max(dim=1).values  # (R,)
    tied = counts == most[:, None]  # (R, C) the clusters with the most votes
    own = own.to(votes.device)
    keeps_own = tied.gather(1, own[:, None]).squeeze(1)  # (R,)
    lowest = tied.float().argmax(dim=1)  # (R,) the first tied cluster
    refined = torch.where(keeps_own, own, lowest)  # (R,)
    outlier = most / k < agreement  # (R,)
    return refined.to(assignment.device), outlier.to(assignment.device)


def cluster_purity(assignment: Tensor, labels: Tensor, num_clusters: int, valid_mask: Optional[Tensor] = None, *,
                   num_classes: Optional[int] = None, all_reduce: AllReduce = _identity) -> tuple[Tensor, float]:
    """How well clusters follow the labels: each cluster's share of its most common class.

    Args:
        assignment: (N,) cluster per point.
        labels: (N,) class per point.
        num_clusters: C.
        valid_mask: (N,) bool, the points that count (e.g. not outliers); None: all.
        num_classes: L; pass it when ``all_reduce`` sums over ranks (every rank's table must have
            the same shape). None: the largest label + 1.
        all_reduce: sums the (C, L) cluster-by-class counts over ranks.

    Returns:
        ``(per_cluster, overall)``: (C,) float purity (NaN for a cluster with no point), and the
        size-weighted purity over all clusters (the share of points in their cluster's majority
        class; NaN when no point counts).
    """
    if valid_mask is not None:
        assignment, labels = assignment[valid_mask], labels[valid_mask]
    num_classes = num_classes if num_classes is not None else int(labels.max()) + 1 if labels.numel() else 1
    table = torch.bincount(assignment.long() * num_classes + labels.long(),
                           minlength=num_clusters * num_classes).view(num_clusters, num_classes)  # (C, L)
    table = all_reduce(table.double())
    sizes, majority = table.sum(1), table.max(1).values  # (C,), (C,)
    per_cluster = (majority / sizes).float()  # (C,) NaN where a cluster is empty
    overall = float(majority.sum() / sizes.sum()) if sizes.sum() > 0 else float("nan")
    return per_cluster, overall
