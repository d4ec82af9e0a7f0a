"""The cluster-level soft teacher: which experts do well on a cluster's validation images.

Pure functions; the sums across ranks come in as a callable, so this module never imports
``torch.distributed``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mgmoe_ds.curriculum.clustering import AllReduce, _identity


def expert_scores(expert_logits: Tensor, labels: Tensor, score: str) -> Tensor:
    """(B, E, C) each expert's logits, (B,) labels -> (B, E) what the teacher grades each expert by:
    ``"log_likelihood"`` log p(true class), ``"probability"`` p(true class), or ``"accuracy"``
    1 where the expert's top class is right, else 0."""
    logp = torch.log_softmax(expert_logits.float(), dim=-1)  # (B, E, C)
    if score == "accuracy":
        return (logp.argmax(-1) == labels[:, None]).float()  # (B, E)
    true = logp.gather(2, labels[:, None, None].expand(-1, logp.shape[1], 1))[..., 0]  # (B, E)
    if score == "probability":
        return true.exp()
    if score != "log_likelihood":
        raise ValueError(f"teacher score {score!r}: expected 'log_likelihood', 'probability' or 'accuracy'")
    return true


def cluster_expert_scores(log_likelihood: Tensor, clusters: Tensor, num_clusters: int,
                          all_reduce: AllReduce = _identity) -> tuple[Tensor, Tensor]:
    """Mean per-expert score on each cluster's validation images.

    Args:
        log_likelihood: (N, E) each validation image's score under each expert: log p_e(true
            class) by default (``curriculum.teacher_score``).
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


def teacher_kl(router_probs: Tensor, teacher: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
    """Mean over images of KL(teacher || router): the teacher is the target the router is pulled to.

    Args:
        router_probs: (B, E) router softmax.
        teacher: (B, E) each image's cluster teacher.
        allowed: optional (B, E) bool, the experts each image's router may use (a gate): the
            teacher is then renormalised over them, where all of the router's probability lies.
    """
    if router_probs.shape[0] == 0:
        return router_probs.sum() * 0.0
    if allowed is not None:
        teacher = teacher * allowed.to(teacher.dtype)  # (B, E)
        teacher = teacher / teacher.sum(-1, keepdim=True).clamp_min(1e-12)
    log_router = torch.log(router_probs.clamp_min(1e-9))
    log_teacher = torch.log(teacher.clamp_min(1e-9))
    return (teacher * (log_teacher - log_router)).sum(-1).mean()
