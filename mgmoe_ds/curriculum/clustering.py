"""Clustering the training images on pooled backbone features, and the cluster-level routing state.

Pure functions and dataclasses: the routing state, the cluster -> experts gate built from it
(:func:`cluster_gate`), and the record of how it was clustered that checkpoints and the stage
JSON keep (``refinement.py`` refines k-means by nearest neighbours). The sums across ranks come
in as a callable (``all_reduce``), so this module never imports ``torch.distributed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from mgmoe_ds.moe.routing import ClusterRouting, RoutingRequest, nearest_centroid

AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over all ranks (identity in one process)


def _identity(t: Tensor) -> Tensor:
    return t


def assign_clusters(features: Tensor, centroids: Tensor) -> Tensor:
    """(N, D), (C, D) -> (N,) index of the nearest centroid (squared Euclidean)."""
    return nearest_centroid(features, centroids)


def kmeans(features: Tensor, num_clusters: int, *, iterations: int = 20, seed: int = 0,
           all_reduce: AllReduce = _identity, initial: Optional[Tensor] = None) -> Tensor:
    """Lloyd's k-means whose sums are reduced across ranks (features never leave their rank).

    Args:
        features: (N, D) this rank's features.
        num_clusters: C.
        iterations: Lloyd iterations.
        seed: seeds the initial centroids (drawn from ``features`` when ``initial`` is None; in a
            multi-rank run pass the same ``initial`` on every rank).
        all_reduce: sums a tensor over ranks.
        initial: optional (C, D) starting centroids.

    Returns:
        (C, D) centroids; an empty cluster keeps its previous centroid.
    """
    features = features.float()
    if initial is None:
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randperm(features.shape[0], generator=generator)[:num_clusters]
        initial = features[picks]
        if initial.shape[0] < num_clusters:  # fewer samples than clusters: repeat some
            initial = initial[torch.arange(num_clusters) % max(1, initial.shape[0])]
    centroids = initial.clone().float()
    for _ in range(iterations):
        centroids, _ = cluster_means(features, assign_clusters(features, centroids), centroids, all_reduce)
    return centroids


def cluster_means(features: Tensor, assignment: Tensor, centroids: Tensor,
                  all_reduce: AllReduce = _identity) -> tuple[Tensor, Tensor]:
    """Each cluster's mean over every rank's points, and how many points it has.

    Args:
        features: (N, D) this rank's points.
        assignment: (N,) their clusters.
        centroids: (C, D) the previous centroids, which a cluster with no point keeps.
        all_reduce: sums a tensor over ranks.

    Returns:
        ``(centroids, counts)``: (C, D) and (C,) float, summed over ranks.
    """
    sums = torch.zeros_like(centroids).index_add_(0, assignment, features.float())  # (C, D)
    counts = torch.bincount(assignment, minlength=centroids.shape[0]).float()  # (C,)
    sums, counts = all_reduce(sums), all_reduce(counts)
    filled = counts > 0
    means = centroids.clone()
    means[filled] = sums[filled] / counts[filled, None]
    return means, counts


def _rounded(value: float) -> Optional[float]:
    """A JSON number to 4 places; NaN (an empty cluster's purity) as null."""
    return None if math.isnan(value) else round(value, 4)


def _purity_json(per_cluster: Tensor, overall: float) -> dict[str, Any]:
    return {"overall": _rounded(overall), "per_cluster": [_rounded(float(x)) for x in per_cluster]}


@dataclass
class ClusteringRecord:
    """How the training images were clustered (``curriculum.clustering``) and how well the clusters
    follow the labels; the knn fields are None after plain k-means."""

    method: str  # "kmeans" or "kmeans+knn"
    kmeans_sizes: Tensor  # (C,) training images per k-means cluster
    kmeans_purity: Tensor  # (C,) each k-means cluster's share of its most common class (NaN: empty)
    kmeans_overall_purity: float  # the share of training images in their k-means cluster's most common class
    neighbours: Optional[int] = None  # k of the refinement
    agreement: Optional[float] = None  # the majority's smallest share of votes for a point not to be an outlier
    outliers: Optional[Tensor] = None  # (C,) outliers by their k-means cluster
    refined_sizes: Optional[Tensor] = None  # (C,) training images per refined cluster, outliers left out
    refined_purity: Optional[Tensor] = None  # (C,) as kmeans_purity, over the refined clusters without outliers
    refined_overall_purity: Optional[float] = None

    def state_dict(self) -> dict[str, Any]:
        """Tensors, strings and numbers (``torch.load(weights_only=True)`` reads them); None fields left out."""
        return {f.name: value.clone() if isinstance(value, Tensor) else value
                for f in fields(self) if (value := getattr(self, f.name)) is not None}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ClusteringRecord":
        return cls(**state)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "method": self.method, "sizes_kmeans": self.kmeans_sizes.long().tolist(),
            "purity_kmeans": _purity_json(self.kmeans_purity, self.kmeans_overall_purity),
        }
        if self.outliers is not None:
            record.update({
                "neighbours": self.neighbours, "agreement": self.agreement, "outliers": int(self.outliers.sum()),
                "outliers_per_kmeans_cluster": self.outliers.long().tolist(),
                "sizes_refined": self.refined_sizes.long().tolist(),
                "purity_refined": _purity_json(self.refined_purity, self.refined_overall_purity),
            })
        return record


@dataclass
class ClusterState:
    """Cluster-level routing state: centroids and each cluster's soft teacher over experts."""

    centroids: Tensor  # (C, D)
    teacher: Tensor  # (C, E)
    scores: Tensor  # (C, E) each expert's mean teacher score (curriculum.teacher_score) on the cluster's val images
    val_counts: Tensor  # (C,)
    train_counts: Tensor  # (C,) training images per cluster (without the outliers of "kmeans+knn")
    clustering: Optional[ClusteringRecord] = None  # how they were clustered (None in checkpoints from before it)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name).clone() for name in _TENSOR_FIELDS}
        if self.clustering is not None:
            state["clustering"] = self.clustering.state_dict()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ClusterState":
        record = state.get("clustering")  # absent from a checkpoint written before it was recorded
        return cls(**{name: state[name] for name in _TENSOR_FIELDS},
                   clustering=None if record is None else ClusteringRecord.from_state_dict(record))

    def top_experts(self, k: int) -> Tensor:
        """(C, k) the k experts each cluster's teacher trusts most, best first."""
        return torch.topk(self.teacher, k, dim=-1).indices

    def left_out(self, k: int) -> list[int]:
        """Experts that no cluster's teacher puts in its top ``k``: the teacher pulls the router
        away from them everywhere (with K = k they are never routed to, so never trained again)."""
        chosen = set(self.top_experts(min(k, self.teacher.shape[1])).flatten().tolist())
        return [e for e in range(self.teacher.shape[1]) if e not in chosen]

    def left_out_warning(self, k: int, expert_names: list[str], num_classes: int, score: str) -> Optional[str]:
        """One line naming the left-out experts with their mean score and the chance level, or None."""
        left = self.left_out(k)
        if not left:
            return None
        weights = self.val_counts.float() / self.val_counts.sum().clamp_min(1)  # (C,)
        mean = (weights[:, None] * self.scores).sum(0)  # (E,) over validation images
        chance = {"log_likelihood": math.log(1 / num_classes), "probability": 1 / num_classes,
                  "accuracy": 1 / num_classes}[score]
        named = ", ".join(f"{expert_names[e]} (validation {score} {float(mean[e]):.3g}, teacher weight at most "
                          f"{float(self.teacher[:, e].max()):.2f})" for e in left)
        return (f"no cluster's teacher puts {named} among its top {k} (chance {score} {chance:.3g}): the routing "
                f"stage pulls the router away from them in every cluster; an expert that learns slowly needs a "
                f"longer warm-up")

    def to_json(self) -> dict[str, Any]:
        return {
            "num_clusters": int(self.centroids.shape[0]),
            "train_images_per_cluster": self.train_counts.long().tolist(),
            "val_images_per_cluster": self.val_counts.long().tolist(),
            "expert_scores": [[round(float(x), 4) for x in row] for row in self.scores],
            "teacher": [[round(float(x), 4) for x in row] for row in self.teacher],
            "top2_experts": self.top_experts(min(2, self.teacher.shape[1])).tolist(),
            "left_out_of_top2": self.left_out(2),
            "clustering": None if self.clustering is None else self.clustering.to_json(),
        }


_TENSOR_FIELDS = ("centroids", "teacher", "scores", "val_counts", "train_counts")  # ClusterState's tensors


def cluster_expert_count(top_k: int, num_experts: int) -> int:
    """How many teacher experts each cluster keeps: its top 2, or its top K when the model routes
    to more (Top-3 stays Top-3)."""
    return min(num_experts, max(2, top_k))


def cluster_gate(clusters: ClusterState, top_k: int) -> RoutingRequest:
    """The cluster -> experts gate: an image may use only its nearest cluster's
    :func:`cluster_expert_count` best experts by the teacher, and the router only re-weights them.
    The residual stage routes so, and with ``moe.routing = "cluster"`` every Top-K stage too.

    Dropless: the experts are fixed per cluster, so capacity would only drop images that evaluation
    and inference (dropless) route; the gate trains as it is evaluated.
    """
    experts = clusters.top_experts(cluster_expert_count(top_k, clusters.teacher.shape[1]))  # (C, k) best first
    return RoutingRequest(clusters=ClusterRouting(clusters.centroids.float(), experts), dropless=True)
