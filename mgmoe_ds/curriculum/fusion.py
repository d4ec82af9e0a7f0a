"""The fusion stage: everything trained so far frozen, the fusion head learns to weigh the experts.

The stage routes as the last stage before it that is not a fusion stage (Top-K as ``moe.routing``
says when there is none), with that stage's cluster state, and evaluation and inference then
route as that stage's model did; only the weighting of the experts each image ran changes
(``moe.fusion``). The head is switched on when the stage starts (``FusionHead.activate``) and
stays on in the checkpoints and exports after it. Only the task loss reaches the head: every other
loss trains nothing here and is weighted 0. The backbone is frozen, so the stage trains from a
feature cache when it can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from mgmoe_ds.curriculum import ClusterState, Stage, create_stage, register_stage
from mgmoe_ds.moe.routing import RoutingRequest

if TYPE_CHECKING:
    from mgmoe_ds.config import RunConfig, StageConfig


def routing_stage_config(config: "StageConfig", run: "RunConfig") -> Optional["StageConfig"]:
    """The entry of ``curriculum.stages`` whose routing the fusion stage ``config`` keeps: the last
    one before it that is not a fusion stage; None when there is none. ``config`` is found by
    identity (equal entries may stand at several places), else by equality."""
    stages = run.curriculum.stages
    index = next((i for i, s in enumerate(stages) if s is config), None)
    if index is None:
        index = next((i for i, s in enumerate(stages) if s == config), 0)
    return next((s for s in reversed(stages[:index]) if s.name != FusionStage.name), None)


@register_stage("fusion")
class FusionStage(Stage):
    # A head trained from its initialisation on frozen inputs: ten times the base lr (1e-2 with the
    # shipped configs' 1e-3), as the trained parts' 1x would barely move it in a short stage.
    default_lr = {"fusion": 10.0}
    uses_fusion = True

    def __init__(self, config: "StageConfig", run: "RunConfig", base_lr: float) -> None:
        super().__init__(config, run, base_lr)
        before = routing_stage_config(config, run)
        self.routed_as: Optional[Stage] = None if before is None else create_stage(before, run, base_lr)

    def routing(self, clusters: Optional[ClusterState]) -> RoutingRequest:
        return self.topk_routing(clusters) if self.routed_as is None else self.routed_as.routing(clusters)

    def inference_routing(self, clusters: Optional[ClusterState]) -> RoutingRequest:
        return self.topk_routing(clusters) if self.routed_as is None else self.routed_as.inference_routing(clusters)

    def own_loss_weights(self) -> dict[str, float]:
        # The head layer's losses (router, experts' own, diversity), the backbone MoE layers', the
        # fallback head's and the box tower's train only frozen parameters here.
        return {"fallback": 0.0, "bbox": 0.0, "moe.*": 0.0, "*.load_balance": 0.0, "*.z_loss": 0.0,
                "*.importance": 0.0, "*.load": 0.0}

    def to_json(self, clusters: Optional[ClusterState]) -> dict[str, Any]:
        return {**super().to_json(clusters), "routed_as": None if self.routed_as is None else self.routed_as.name}
