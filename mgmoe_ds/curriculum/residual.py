"""Stage 2, residual fine-tuning: routing frozen at cluster level, the clusters' expert heads train.

Each image may use only its cluster's top experts by the teacher (the MG-MoE recipe's top 2, or
top K when the model routes to more, :func:`cluster_expert_count`); the router only re-weights
them. The heads of those experts train, every other expert's head keeps its weights.
"""

from __future__ import annotations

from typing import Any, Optional

from mgmoe_ds.curriculum import ClusterState, Stage, StageHooks, register_stage
from mgmoe_ds.moe.routing import ClusterRouting, RoutingRequest


def cluster_expert_count(top_k: int, num_experts: int) -> int:
    """How many teacher experts each cluster keeps: its top 2, or its top K when the model routes
    to more (Top-3 stays Top-3)."""
    return min(num_experts, max(2, top_k))


@register_stage("residual")
class ResidualStage(Stage):
    default_lr = {"router": 0.5, "expert_heads": 1.0}

    def on_stage_start(self, hooks: StageHooks) -> None:
        # On the backbone this stage keeps frozen: stage 1's last clustering saw it one epoch earlier.
        hooks.recompute_clusters()

    def cluster_experts(self, clusters: ClusterState) -> Any:
        """(C, k) each cluster's allowed experts, best first."""
        return clusters.top_experts(cluster_expert_count(self.run.moe.top_k, clusters.teacher.shape[1]))

    def routing(self, clusters: Optional[ClusterState]) -> RoutingRequest:
        if clusters is None:
            return RoutingRequest()
        # Dropless: routing is frozen to each cluster's experts, so capacity would only drop images
        # that evaluation and inference (dropless) route; the stage trains as it is evaluated.
        return RoutingRequest(clusters=ClusterRouting(clusters.centroids.float(), self.cluster_experts(clusters)),
                              dropless=True)

    def inference_routing(self, clusters: Optional[ClusterState]) -> RoutingRequest:
        return self.routing(clusters)

    def group_options(self, group: str) -> dict[str, Any]:
        # A frozen head gets zero gradients; without weight decay AdamW then leaves it exactly as it is.
        return {"weight_decay": 0.0} if group == "expert_heads" else {}

    def frozen_heads(self, clusters: Optional[ClusterState], num_experts: int) -> set[int]:
        if clusters is None or "expert_heads" not in self.group_lr:
            return set()
        return set(range(num_experts)) - set(self.cluster_experts(clusters).flatten().tolist())

    def to_json(self, clusters: Optional[ClusterState]) -> dict[str, Any]:
        record = super().to_json(clusters)
        if clusters is not None and "expert_heads" in self.group_lr:
            record["unfrozen_heads"] = sorted(set(self.cluster_experts(clusters).flatten().tolist()))
        return record
