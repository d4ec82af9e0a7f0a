"""Stage 2, residual fine-tuning: routing frozen at cluster level, the clusters' expert heads train.

Each image may use only its cluster's top experts by the teacher (the MG-MoE recipe's top 2, or
top K when the model routes to more, :func:`cluster_expert_count`); the router only re-weights
them: the cluster -> experts gate (:func:`~mgmoe_ds.curriculum.clustering.cluster_gate`, which
``moe.routing = "cluster"`` makes every Top-K stage route through). The heads of those experts
train, every other expert's head keeps its weights.
"""

from __future__ import annotations

from typing import Any, Optional

from mgmoe_ds.curriculum import ClusterState, Stage, StageHooks, register_stage
from mgmoe_ds.curriculum.clustering import cluster_expert_count, cluster_gate
from mgmoe_ds.moe.routing import RoutingRequest


@register_stage("residual")
class ResidualStage(Stage):
    default_lr = {"router": 0.5, "expert_heads": 1.0}
    computes_clusters = True

    def on_stage_start(self, hooks: StageHooks) -> None:
        # On the backbone this stage keeps frozen: stage 1's last clustering saw it one epoch earlier.
        hooks.recompute_clusters()

    def cluster_experts(self, clusters: ClusterState) -> Any:
        """(C, k) each cluster's allowed experts, best first."""
        return clusters.top_experts(cluster_expert_count(self.run.moe.top_k, clusters.teacher.shape[1]))

    def routing(self, clusters: Optional[ClusterState]) -> RoutingRequest:
        return RoutingRequest() if clusters is None else cluster_gate(clusters, self.run.moe.top_k)

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
