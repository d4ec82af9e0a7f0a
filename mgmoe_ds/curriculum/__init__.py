"""The curriculum's stages: a registry of small classes, each saying what it trains, how it routes,
what it adds to the loss, what it does at its epoch hooks and what it freezes.

``@register_stage(name)`` fills the registry, ``create_stage`` builds a stage from its entry in
``curriculum.stages`` and ``list_stages`` names them; config validation reads the registry, so a
stage name or parameter group that does not exist fails when the config is loaded. Adding a
stage is one file that defines a ``Stage`` subclass plus its import line at the bottom of this
file. The trainer runs any stage the same way; see ``train/trainer.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Protocol

from torch import Tensor

from mgmoe_ds.curriculum.clustering import ClusterState, cluster_gate
from mgmoe_ds.moe.routing import RoutingRequest
from mgmoe_ds.registry import Registry

if TYPE_CHECKING:
    from mgmoe_ds.config import RunConfig, StageConfig



class StageHooks(Protocol):
    """What a stage may ask of the trainer at its hooks."""

    clusters: Optional[ClusterState]  # the run's cluster-level routing state (None until computed)

    def recompute_clusters(self) -> None:
        """Clusters the training images on the current backbone and refits each cluster's teacher."""


class Stage:
    """One curriculum stage. Subclasses set ``name`` and ``default_lr`` and override what differs.

    Args:
        config: the stage's entry in ``curriculum.stages``.
        run: the whole run configuration.
        base_lr: the DeepSpeed optimizer's lr, which ``default_lr`` multiplies.
    """

    name: ClassVar[str] = ""
    # Learning rate of each parameter group as a multiple of the optimizer's lr; a group absent
    # here is frozen. A stage's ``lr`` in the config (absolute values) replaces the table.
    default_lr: ClassVar[dict[str, float]] = {}
    # The stage trains the fusion head, which the trainer switches on when the stage starts.
    uses_fusion: ClassVar[bool] = False
    # The stage clusters the training images (its hooks call ``recompute_clusters``).
    computes_clusters: ClassVar[bool] = False

    def __init__(self, config: "StageConfig", run: "RunConfig", base_lr: float) -> None:
        self.config, self.run = config, run
        table = config.lr or {group: multiple * base_lr for group, multiple in self.default_lr.items()}
        if run.cache.depth is not None and "backbone" in table and "backbone_top" not in table:
            table = {**table, "backbone_top": table["backbone"]}  # the backbone's top trains with the rest of it
        # The backbone's MoE layers train with the part of the backbone they sit in (above the cut
        # when there is one), unless the stage sets their lr.
        around = "backbone_top" if run.cache.depth is not None else "backbone"
        if run.model.backbone_moe is not None and around in table and "backbone_moe" not in table:
            table = {**table, "backbone_moe": table[around]}
        # lr 0 freezes a group; so does ``train.freeze``, in every stage, exactly the groups it names
        # (the backbone's top and its MoE layers still train with it unless named too)
        self.group_lr = {group: lr for group, lr in table.items() if lr > 0 and group not in run.train.freeze}
        # The box tower trains while the features it reads do (its task shapes them), unless set.
        if (run.model.tasks.bbox is not None and around in self.group_lr and "box_tower" not in table
                and "box_tower" not in run.train.freeze):
            self.group_lr["box_tower"] = self.group_lr[around]

    # -- what it trains and freezes ------------------------------------------------------------

    @property
    def trains_backbone(self) -> bool:
        """Whether the backbone below the cache's cut trains (then no feature cache is valid); MoE
        layers inside a backbone with no cut are part of it."""
        return "backbone" in self.group_lr or (self.run.cache.depth is None and "backbone_moe" in self.group_lr)

    def group_options(self, group: str) -> dict[str, Any]:
        """Extra optimizer options of a trained group (e.g. ``weight_decay``)."""
        return {}

    def frozen_heads(self, clusters: Optional[ClusterState], num_experts: int) -> set[int]:
        """Experts whose classification heads stay frozen although ``expert_heads`` trains."""
        return set()

    # -- how it routes ---------------------------------------------------------------------------

    def routing(self, clusters: Optional[ClusterState]) -> RoutingRequest:
        """The routing the stage trains and validates with."""
        return self.topk_routing(clusters)

    def inference_routing(self, clusters: Optional[ClusterState]) -> RoutingRequest:
        """The routing a model whose last stage this was uses in evaluation and inference."""
        return self.topk_routing(clusters)

    def topk_routing(self, clusters: Optional[ClusterState]) -> RoutingRequest:
        """Top-K as ``moe.routing`` says: the router's own choice of K experts ("topk", and before
        any clustering), or once clusters exist ("cluster") the cluster -> experts gate
        (``clustering.cluster_gate``): K among the image's cluster's teacher experts."""
        if self.run.moe.routing == "cluster" and clusters is not None:
            return cluster_gate(clusters, self.run.moe.top_k)
        return RoutingRequest()

    # -- what it adds to the loss ----------------------------------------------------------------

    def extra_losses(self, out: Any, clusters: Optional[ClusterState]) -> dict[str, Tensor]:
        """Losses beyond the model's own, from one forward's ``ModelOutput``."""
        return {}

    def own_loss_weights(self) -> dict[str, float]:
        """The stage's loss weights, by name or glob pattern (before the user's ``loss_weights``)."""
        return {}

    def loss_weights(self) -> dict[str, float]:
        """The stage's weights, then the user's ``loss_weights`` for it (``model.loss_weights`` adds the defaults)."""
        return {**self.own_loss_weights(), **self.config.loss_weights}

    # -- epoch hooks -----------------------------------------------------------------------------

    def on_stage_start(self, hooks: StageHooks) -> None:
        """Before the stage's engine is built (e.g. routing state the stage needs)."""

    def on_epoch_start(self, hooks: StageHooks) -> None:
        """At the start of each epoch, before its first step."""

    def to_json(self, clusters: Optional[ClusterState]) -> dict[str, Any]:
        """What ``stages/<i>_<name>.json`` records about the stage."""
        return {"stage": self.name, "trained_groups": dict(self.group_lr), "moe_routing": self.run.moe.routing,
                "routing": self.routing(clusters).to_json()}


STAGES: Registry[type[Stage]] = Registry("curriculum stage")


def register_stage(name: str) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator that registers a ``Stage`` subclass under ``name`` (its ``name`` too); duplicates raise."""

    def add(cls: type[Stage]) -> type[Stage]:
        STAGES.register(name)(cls)
        cls.name = name
        return cls

    return add


def list_stages() -> list[str]:
    """Registered stage names, sorted."""
    return STAGES.names()


def stage_class(name: str) -> type[Stage]:
    return STAGES.get(name)


def create_stage(config: "StageConfig", run: "RunConfig", base_lr: float) -> Stage:
    """The stage for ``config`` (an entry of ``curriculum.stages``)."""
    return stage_class(config.name)(config, run, base_lr)


# Imported for their registration side effect, explicitly, one per stage.
from mgmoe_ds.curriculum import fusion, residual, routing, warmup  # noqa: E402,F401

__all__ = ["Stage", "StageHooks", "register_stage", "create_stage", "list_stages", "stage_class", "ClusterState"]
