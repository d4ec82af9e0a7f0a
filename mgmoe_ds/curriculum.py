"""The MG-MoE curriculum: what each stage trains, how it routes, and the cluster-level teacher.

Stages (set in the ``"mgmoe"`` block as ``curriculum.stages``):

- ``warmup``: every expert sees every image (dense routing, equal weights); the router is frozen.
- ``routing`` (stage 1): training images are clustered on backbone features (k-means, recomputed
  every epoch); each cluster gets a soft teacher over experts from validation statistics
  (softmax of each expert's mean log-likelihood of the true class on the cluster's validation
  images, with a temperature); the router trains with the task loss plus
  ``kl_weight * KL(teacher || router)``.
- ``residual`` (stage 2): routing is frozen at cluster level (each image may use only its
  cluster's top-2 teacher experts, top-K when ``moe.top_k`` > 2; the router only re-weights
  them); the classification heads of those experts are unfrozen, the other experts stay frozen;
  router and heads train with their own learning rates.

Pure functions and dataclasses; the reductions across ranks are passed in as a callable so this
module never imports ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from mgmoe_ds.config import StageConfig

AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over all ranks (identity in one process)


def _identity(t: Tensor) -> Tensor:
    return t


# Default learning-rate multipliers (of the DeepSpeed optimizer's lr) per stage and group.
# A group absent from a stage's ``lr`` is frozen in that stage.
DEFAULT_STAGE_LR = {
    "warmup": {"backbone": 1.0, "experts": 1.0, "expert_heads": 1.0, "fallback": 1.0},
    "routing": {"backbone": 0.1, "experts": 0.5, "expert_heads": 0.5, "fallback": 1.0, "router": 1.0},
    "residual": {"router": 0.5, "expert_heads": 1.0},
}
GROUP_NAMES = ("backbone", "router", "fallback", "experts", "expert_heads")


@dataclass
class StagePlan:
    """How one stage runs: routing mode and which parameter groups train at which lr."""

    name: str
    mode: str  # "dense" or "topk"
    uniform_weights: bool  # combine experts with equal weights (warm-up)
    uses_teacher: bool  # the KL term to the cluster teacher (stage 1)
    frozen_routing: bool  # per-image allowed experts = its cluster's top-2 (stage 2)
    group_lr: dict[str, float] = field(default_factory=dict)  # trained groups and their lr


def plan_stage(stage: StageConfig, base_lr: float) -> StagePlan:
    """Resolves a configured stage into a plan.

    Args:
        stage: the stage from the config; ``stage.lr`` (group -> absolute lr) replaces the
            defaults when given.
        base_lr: the DeepSpeed optimizer's lr, which the default multipliers scale.
    """
    if stage.lr:
        unknown = sorted(set(stage.lr) - set(GROUP_NAMES))
        if unknown:
            raise ValueError(f"curriculum stage {stage.name!r}: unknown parameter group {unknown[0]!r} in lr; "
                             f"accepted: {', '.join(GROUP_NAMES)}")
        group_lr = {g: lr for g, lr in stage.lr.items() if lr > 0}
    else:
        group_lr = {g: m * base_lr for g, m in DEFAULT_STAGE_LR[stage.name].items()}
    return StagePlan(
        name=stage.name,
        mode="dense" if stage.name == "warmup" else "topk",
        uniform_weights=stage.name == "warmup",
        uses_teacher=stage.name == "routing",
        frozen_routing=stage.name == "residual",
        group_lr=group_lr,
    )


# ---------------------------------------------------------------------------------------------
# Clustering


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
        assignment = assign_clusters(features, centroids)  # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, features)  # (C, D)
        counts = torch.bincount(assignment, minlength=num_clusters).float()  # (C,)
        sums, counts = all_reduce(sums), all_reduce(counts)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def assign_clusters(features: Tensor, centroids: Tensor) -> Tensor:
    """(N, D), (C, D) -> (N,) index of the nearest centroid (squared Euclidean)."""
    distances = torch.cdist(features.float(), centroids.float())  # (N, C)
    return distances.argmin(dim=1)


# ---------------------------------------------------------------------------------------------
# The soft teacher


def cluster_expert_scores(log_likelihood: Tensor, clusters: Tensor, num_clusters: int,
                          all_reduce: AllReduce = _identity) -> tuple[Tensor, Tensor]:
    """Mean per-expert log-likelihood of the true class on each cluster's validation images.

    Args:
        log_likelihood: (N, E) log p_e(true class) of each validation image under each expert.
        clusters: (N,) cluster of each validation image.
        num_clusters: C.
        all_reduce: sums across ranks.

    Returns:
        ``(scores (C, E), counts (C,))``; a cluster with no validation image gets the mean
        over all images.
    """
    num_experts = log_likelihood.shape[1]
    sums = torch.zeros(num_clusters, num_experts).index_add_(0, clusters, log_likelihood.float())  # (C, E)
    counts = torch.bincount(clusters, minlength=num_clusters).float()  # (C,)
    sums, counts = all_reduce(sums), all_reduce(counts)
    overall = sums.sum(0) / counts.sum().clamp_min(1)  # (E,)
    scores = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], overall.expand_as(sums))
    return scores, counts


def cluster_teacher(scores: Tensor, temperature: float) -> Tensor:
    """(C, E) expert scores -> (C, E) teacher distributions ``softmax(scores / temperature)``."""
    return torch.softmax(scores / temperature, dim=-1)


def teacher_kl(router_probs: Tensor, teacher: Tensor) -> Tensor:
    """Mean over images of KL(teacher || router): pulls the router towards its cluster's teacher.

    Args:
        router_probs: (B, E) router softmax.
        teacher: (B, E) each image's cluster teacher.
    """
    if router_probs.shape[0] == 0:
        return router_probs.sum() * 0.0
    log_router = torch.log(router_probs.clamp_min(1e-9))
    log_teacher = torch.log(teacher.clamp_min(1e-9))
    return (teacher * (log_teacher - log_router)).sum(-1).mean()


def cluster_expert_count(top_k: int, num_experts: int) -> int:
    """How many teacher experts each cluster keeps in the residual stage: its top 2 (the MG-MoE
    recipe), or its top K when the model routes to more (Top-3 stays Top-3)."""
    return min(num_experts, max(2, top_k))


def top_experts_per_cluster(teacher: Tensor, k: int = 2) -> Tensor:
    """(C, E) teacher -> (C, k) the k experts each cluster trusts most, best first."""
    return torch.topk(teacher, k, dim=-1).indices


def allowed_from_clusters(clusters: Tensor, cluster_experts: Tensor, num_experts: int) -> Tensor:
    """(B,) clusters and (C, k) experts -> (B, E) bool mask of each image's allowed experts."""
    mask = torch.zeros(clusters.shape[0], num_experts, dtype=torch.bool, device=clusters.device)  # (B, E)
    return mask.scatter_(1, cluster_experts.to(clusters.device)[clusters], True)
