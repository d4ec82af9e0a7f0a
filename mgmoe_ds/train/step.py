"""One training step: forward, the stage's losses, one agreed finite-loss vote, backward, update.

Runs with any engine that has ``__call__`` (the model's forward), ``backward(loss)`` and
``step()``: DeepSpeed's engine in training, a plain ``torch.optim`` wrapper in the unit tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from mgmoe_ds.model import ModelOutput, loss_weights, weighted_loss
from mgmoe_ds.moe.routing import RoutingRequest
from mgmoe_ds.train.mixing import Mixed, Mixing
from mgmoe_ds.train.passes import model_inputs


@dataclass
class StepResult:
    """What one step did."""

    finite: bool  # False: some rank's loss was not finite and every rank skipped the update
    losses: dict[str, Tensor]  # raw losses by name (detached)
    out: ModelOutput
    images: int
    seconds: float


@dataclass
class TrainStep:
    """The step of one stage.

    Attributes:
        stage: the curriculum stage (its extra losses and loss weights).
        routing: the stage's routing for this epoch.
        comm: the run's ``Collectives`` (the finite-loss vote).
        device, input_dtype: where and in what dtype batches enter the model.
        moe_config: the run's ``moe`` block (default router-loss weights).
        reorder: when DeepSpeed reduces gradients in arrival order (ZeRO-2), turns the loss into
            one whose backward reaches the parameters in the same order on every rank
            (``train.distributed.fixed_order_loss``); None otherwise.
        mixing: this epoch's Mixup/CutMix (``train.mixing.mixing_for_epoch``, set by the trainer at
            each epoch); None: batches pass as they are. Only batches of images are mixed (a
            feature cache is refused while a stage mixes), into soft targets; the box task gets no
            box from a mixed batch (its boxes no longer describe the images). The passes that feed
            the cluster teacher never come here, so no mixed image enters its statistics.
        distiller: with a ``distill`` block, turns each batch's (mixed) labels into distilled
            targets (soft cross-entropy everywhere the model takes targets; the experts' own
            losses see each row's argmax) and adds ``distill.cosine``.
        pseudo_weight: ``data.pseudo_weight``, the weight of an image with a pseudo-label
            (``batch["pseudo"]``) in the losses on its targets (:meth:`sample_weights`).
    """

    stage: Any
    routing: RoutingRequest
    comm: Any
    device: torch.device
    input_dtype: torch.dtype
    moe_config: Any
    reorder: Optional[Callable[..., Tensor]] = None
    backbone_moe: Any = None  # the run's model.backbone_moe (its soft constraint's loss weights)
    tasks: Any = None  # the run's model.tasks (the box task's loss weight; with it, batches' boxes are targets)
    mixing: Optional[Mixing] = None  # this epoch's Mixup/CutMix; None: off
    distiller: Any = None  # the run's ``train.distill.Distiller``; None: the labels alone are the targets
    pseudo_weight: float = 1.0  # data.pseudo_weight; 1: pseudo-labels weigh as labels

    def __call__(self, engine: Any, batch: dict, clusters: Any) -> StepResult:
        started = time.perf_counter()
        labels = batch["labels"].to(self.device, non_blocking=True)
        inputs, targets = model_inputs(batch, self.device, self.input_dtype), labels
        mixing = self.mixing if inputs["images"] is not None else None
        mixed = None
        if mixing is not None:  # (B, classes) soft targets; the experts' own losses see each row's larger share
            mixed = mixing(inputs["images"], labels)
            inputs["images"], targets = mixed.images, mixed.targets
        if self.distiller is not None:  # (B, classes): the smoothed label's share and the teacher's
            targets = self.distiller.targets(batch, targets, lam=None if mixed is None else mixed.lam)
        weights = self.sample_weights(batch, mixed)
        out = engine(targets=targets, routing=self.routing, **inputs,
                     **self.box_targets(batch, mixed=mixing is not None), **weights)
        losses = {**out.losses, **self.stage.extra_losses(out, clusters)}
        if self.distiller is not None:
            losses.update(self.distiller.losses(out.logits, targets, weights.get("sample_weights")))
        total = weighted_loss(losses, loss_weights(self.moe_config, self.stage.loss_weights(),
                                                      backbone_moe=self.backbone_moe, tasks=self.tasks))
        # One vote: a non-finite loss on any rank skips the update on every rank.
        finite = bool(self.comm.reduce_int(int(bool(torch.isfinite(total))), "min"))
        detached = {name: value.detach() for name, value in losses.items()}
        if finite:
            if self.reorder is not None:
                anchors = [o.exchange_anchor for o in out.layer_outputs.values() if o.exchange_anchor is not None]
                total = self.reorder(total, anchors)
            engine.backward(total)
            engine.step()
        return StepResult(finite, detached, out, int(labels.shape[0]), time.perf_counter() - started)

    def sample_weights(self, batch: dict, mixed: Optional[Mixed] = None) -> dict[str, Tensor]:
        """The model's ``sample_weights`` for ``batch``: ``pseudo_weight`` for each image with a
        pseudo-label (``batch["pseudo"]``), 1 for the others; none (the plain mean) when every
        weight would be 1, so a batch without pseudo-labels keeps exactly its unweighted loss.

        The model divides the weighted sums by the number of images, not by the weights' sum
        (``moe.losses.weighted_cross_entropy``): a labelled image then counts the same whatever
        else its batch holds, and data parallelism's averaged gradient is that of the global
        batch's weighted sum over its size. A mixed image (Mixup/CutMix with the flipped batch)
        weighs its two images' weights in the mix's shares, ``lam`` and ``1 - lam``.
        """
        pseudo = batch.get("pseudo")
        if self.pseudo_weight == 1.0 or pseudo is None or not bool(pseudo.any()):
            return {}
        weights = torch.where(pseudo.to(self.device), self.pseudo_weight, 1.0)  # (B,) float32
        if mixed is not None:
            weights = mixed.lam * weights + (1.0 - mixed.lam) * weights.flip(0)  # (B,) as the images were mixed
        return {"sample_weights": weights}

    def box_targets(self, batch: dict, mixed: bool = False) -> dict[str, Any]:
        """The box task's model arguments for ``batch`` (none without the task or the batch's boxes;
        none of its boxes when ``mixed``: they no longer describe the images).

        Each rank divides its summed box loss by the mean number of boxes per rank over all ranks
        (one all-reduce): the ranks' averaged gradients are then those of the mean over every box
        of the global batch, however unevenly the boxes fall on the ranks.
        """
        if self.tasks is None or self.tasks.bbox is None or "has_box" not in batch:
            return {}
        has_box = batch["has_box"].to(self.device, non_blocking=True) & (not mixed)  # (B,) bool; mixed: all False
        boxes_in_world = self.comm.reduce_int(int(has_box.sum()), "sum")
        return {"boxes": batch["boxes"].to(self.device, non_blocking=True), "has_box": has_box,
                "box_normaliser": max(1, boxes_in_world) / self.comm.world_size}


def trained_groups(model: Any, stage: Any) -> list[dict[str, Any]]:
    """The optimizer groups of what ``stage`` trains (``{"name", "params", "lr", **options}``);
    every other parameter is frozen (``requires_grad`` False)."""
    groups = []
    for name, params in model.parameter_groups().items():
        lr = stage.group_lr.get(name)
        for p in params:
            p.requires_grad_(lr is not None)
        if lr is not None and params:
            groups.append({"name": name, "params": params, "lr": lr, **stage.group_options(name)})
    return groups
