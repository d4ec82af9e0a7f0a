"""Stage 1, routing: Top-K routing, the router pulled towards each cluster's soft teacher.

At the start of every epoch the training images are clustered on pooled backbone features and
each cluster gets a teacher over experts from validation statistics (``curriculum.teacher``);
the loss adds ``kl_weight * KL(teacher || router)`` for each image's cluster. With
``moe.routing = "cluster"`` the stage routes through the cluster -> experts gate once the first
clustering is done, and the KL compares the teacher over each image's allowed experts
(renormalised), the only ones the gated router puts probability on.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mgmoe_ds.curriculum import ClusterState, Stage, StageHooks, register_stage
from mgmoe_ds.curriculum.clustering import assign_clusters
from mgmoe_ds.curriculum.teacher import teacher_kl


@register_stage("routing")
class RoutingStage(Stage):
    default_lr = {"backbone": 0.1, "experts": 0.5, "expert_heads": 0.5, "fallback": 1.0, "router": 1.0}
    computes_clusters = True

    def on_epoch_start(self, hooks: StageHooks) -> None:
        hooks.recompute_clusters()

    def extra_losses(self, out: Any, clusters: Optional[ClusterState]) -> dict[str, Tensor]:
        if clusters is None:
            return {}
        assigned = assign_clusters(out.pooled.detach(), clusters.centroids)  # (B,)
        gated = self.run.moe.routing == "cluster"  # the router's logits are -inf outside the gate
        allowed = torch.isfinite(out.route.logits) if gated else None  # (B, E)
        return {"kl": teacher_kl(out.route.probs, clusters.teacher.to(out.pooled.device)[assigned], allowed)}

    def own_loss_weights(self) -> dict[str, float]:
        return {"kl": self.run.curriculum.kl_weight}
