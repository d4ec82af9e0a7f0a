"""Routing variants over a split: the backbone runs once per batch, every variant is a ``forward_head``.

A variant is a ``RoutingRequest``; ``run_passes`` collects
each variant's logits, per-expert weights and use, and its time, on identical inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from mgmoe_ds.box_tower import BOX_FEATURE
from mgmoe_ds.inference import InferenceMeta
from mgmoe_ds.moe.routing import RoutingRequest

ROUTED = "routed"  # name of the trained model's inference routing pass
DENSE = "dense"  # every expert, router weights
MAX_TSNE_POINTS = 2000
POOL_FACTOR = 10  # the t-SNE sample is drawn from the first POOL_FACTOR * max_points images

@dataclass
class PassResult:
    """One routing variant over the whole split."""

    logits: Tensor  # (N, classes) fp32
    weights: Tensor  # (N, E) routing weight of each expert per image (0 where not used)
    used: Tensor  # (N, E) bool: the image ran through the expert
    seconds: float = 0.0  # forward_head time


@dataclass
class SplitOutputs:
    """Every pass over one split, plus what the figures need."""

    labels: Tensor  # (N,)
    keys: list[str]
    passes: dict[str, PassResult]
    pooled_sample: Tensor  # (M, D) pooled backbone features of M <= max_points images
    sample_index: Tensor  # (M,) which images (rows of labels) those are
    backbone_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # per backbone MoE layer: (N, E) share of each image's tokens' combine weight on each expert
    token_moe_mass: dict[str, Tensor] = field(default_factory=dict)
    # the box tower's (N, 4) boxes, the true (N, 4) boxes and (N,) which images have one; None without a tower
    boxes: Optional[tuple[Tensor, Tensor, Tensor]] = None


def image_expert_mass(route, num_experts: int, num_images: int) -> Tensor:
    """A backbone MoE layer's route -> (B, E): the mean over each image's tokens of their combine
    weight on each expert (a row sums to 1 less its dropped tokens' share)."""
    weights, _ = _per_expert(route, num_experts)  # (B * n, E)
    return weights.reshape(num_images, -1, num_experts).mean(dim=1)  # (B, E)


def _per_expert(route, num_experts: int) -> tuple[Tensor, Tensor]:
    """(B, K) choices -> (B, E) weights and (B, E) bool used, over the kept choices."""
    indices, kept = route.expert_indices.cpu(), route.kept.cpu()  # (B, K)
    weights = torch.zeros(indices.shape[0], num_experts).scatter_add_(1, indices, (route.weights.float().cpu() * kept))
    used = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool).scatter_(1, indices, kept)
    return weights, used


@torch.no_grad()
def run_passes(model, loader, passes: dict[str, RoutingRequest], *, max_points: int = MAX_TSNE_POINTS,
               desc: str = "eval", progress: bool = True, device: Optional[torch.device] = None) -> SplitOutputs:
    """Runs every routing variant in ``passes`` on each batch's backbone features.

    Args:
        model: an ``MGMoE`` with every expert (from ``load_trained``).
        loader: batches ``{"images", "labels", "keys"}``.
        passes: name -> the routing of that variant.
        max_points: pooled features kept for the embedding figure: a seeded random sample of
            the first ``POOL_FACTOR * max_points`` images (bounded memory on large splits).
        desc: progress bar label.
        progress: show a tqdm progress bar.
        device: where the images go (the model's device); default the CPU.
    """
    from tqdm.auto import tqdm

    model.eval()
    labels, keys, pooled_sample = [], [], []
    logits: dict[str, list[Tensor]] = {name: [] for name in passes}
    weights: dict[str, list[Tensor]] = {name: [] for name in passes}
    used: dict[str, list[Tensor]] = {name: [] for name in passes}
    seconds = {name: 0.0 for name in passes}
    token_moe_mass: dict[str, list[Tensor]] = {}
    boxes: list[tuple[Tensor, Tensor, Tensor]] = []  # per batch: predicted, true, has_box
    backbone_seconds = 0.0
    kept_points = 0
    device = device or torch.device("cpu")

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the kernels, not their launch
        return time.perf_counter()

    for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        started = clock()
        images = batch["images"].to(device, dtype=torch.float32)
        features, records = model.forward_backbone(images)
        backbone_seconds += clock() - started
        for name, record in records.items():
            token_moe_mass.setdefault(name, []).append(
                image_expert_mass(record.output.route, record.output.route.probs.shape[1], images.shape[0]))
        pooled = features["pooled"]  # (B, D)
        for name, routing in passes.items():
            started = clock()
            out = model.forward_head(features, routing=routing)
            seconds[name] += clock() - started
            logits[name].append(out.logits.float().cpu())
            per_expert_weights, per_expert_used = _per_expert(out.route, model.num_experts)
            weights[name].append(per_expert_weights)
            used[name].append(per_expert_used)
        if model.box_tower is not None:  # not routed: one box per image whatever the variant
            predicted = model.box_tower(features[BOX_FEATURE]).float().cpu()  # (B, 4)
            true = batch.get("boxes", torch.zeros_like(predicted)).float().cpu()  # (B, 4)
            has_box = batch.get("has_box", torch.zeros(predicted.shape[0], dtype=torch.bool)).cpu()  # (B,)
            boxes.append((predicted, true, has_box))
        labels.append(batch["labels"].cpu())
        keys += list(batch["keys"])
        if kept_points < POOL_FACTOR * max_points:
            pooled_sample.append(pooled[:POOL_FACTOR * max_points - kept_points].float().cpu())
            kept_points += pooled_sample[-1].shape[0]
    if not labels:
        raise ValueError("the evaluation split has no images")
    pooled_all = torch.cat(pooled_sample) if pooled_sample else torch.zeros(0, model.backbone.info.pooled_dim)
    generator = torch.Generator().manual_seed(0)
    sample_index = torch.randperm(pooled_all.shape[0], generator=generator)[:max_points].sort().values  # (M,)
    results = {name: PassResult(torch.cat(logits[name]), torch.cat(weights[name]), torch.cat(used[name]), seconds[name])
               for name in passes}
    return SplitOutputs(torch.cat(labels), keys, results, pooled_all[sample_index], sample_index, backbone_seconds,
                        token_moe_mass={name: torch.cat(mass) for name, mass in token_moe_mass.items()},
                        boxes=tuple(torch.cat(part) for part in zip(*boxes)) if boxes else None)


def routing_passes(model, meta: InferenceMeta) -> dict[str, RoutingRequest]:
    """The trained routing, dense fusion, and each single expert."""
    passes: dict[str, RoutingRequest] = {ROUTED: meta.routing, DENSE: RoutingRequest.dense()}
    for e, name in enumerate(model.expert_names):
        passes[f"expert {e}:{name}"] = RoutingRequest.single(e)
    return passes
