"""Warm-up: every expert sees every image with equal weights; the router does not train."""

from __future__ import annotations

from typing import Optional

from mgmoe_ds.curriculum import ClusterState, Stage, register_stage
from mgmoe_ds.moe.routing import RoutingRequest


@register_stage("warmup")
class WarmupStage(Stage):
    default_lr = {"backbone": 1.0, "experts": 1.0, "expert_heads": 1.0, "fallback": 1.0}

    def routing(self, clusters: Optional[ClusterState]) -> RoutingRequest:
        return RoutingRequest.dense(uniform_weights=True)

    def own_loss_weights(self) -> dict[str, float]:
        return {"*.load_balance": 0.0, "*.z_loss": 0.0}  # the router is frozen: its losses would do nothing
