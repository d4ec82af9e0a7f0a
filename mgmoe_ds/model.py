"""MG-MoE: a shared timm backbone, a router on pooled features, and heterogeneous routed experts.

The backbone runs once per image; the features the configured experts need travel as each
image's payload to its Top-K experts (possibly on other ranks) and the fused logits are the
renormalised router weights times the expert logits (re-weighted per image by the fusion head
once the "fusion" stage trained it). A shared fallback head on the pooled features answers for an
image that lost every expert to capacity; it is trained on every image (its own loss) so that the
answer is a real prediction. No ``torch.distributed`` here.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from mgmoe_ds.backbone import CUT_KEY, Backbone
from mgmoe_ds.backbone_moe import install_token_moe
from mgmoe_ds.box_tower import BOX_FEATURE, BoxTower, box_loss
from mgmoe_ds.config import PARAMETER_GROUPS, ExpertSpec, ModelConfig, MoEConfig
from mgmoe_ds.experts import create_expert, expert_class
from mgmoe_ds.flops import count_flops, count_parameters
from mgmoe_ds.moe.fusion import FusionHead
from mgmoe_ds.moe.layer import MoEOutput, RouteOutput, RoutedExperts, layer_from_config
from mgmoe_ds.moe.losses import diversity_loss, expert_cross_entropy, weighted_cross_entropy
from mgmoe_ds.moe.routing import Routing, RoutingRequest, request_for_layer, requests_by_name
from mgmoe_ds.moe.token_layer import TokenMoE, TokenMoERecord, collect_token_moe, token_moe_layers

ROUTER_INPUT = "pooled"
HEAD_LAYER = "moe"  # name of the per-image routed layer of heterogeneous experts (its module path)

# Default loss weights, by name or glob pattern over the loss names (``weighted_loss``): the task
# cross-entropy, the fallback head's, each routed layer's router losses and its experts' diversity.
BASE_LOSS_WEIGHTS = {"task": 1.0, "fallback": 0.5}


@dataclass
class ModelOutput:
    """One forward of MG-MoE; routes and losses are keyed by the routed layer they come from.

    A dataclass on purpose: DeepSpeed hooks the tensors (and tuples, lists, dicts of tensors) an
    engine's forward returns, and those hooks must not run inside the trainer's fixed-order
    backward (``train.distributed.fixed_order_loss``).
    """

    logits: Tensor  # (B, classes) fused logits
    routes: dict[str, RouteOutput]  # per routed layer: weights, indices, capacity and drop counts
    pooled: Tensor  # (B, D) the head layer's router input (pooled backbone features)
    losses: dict[str, Tensor] = field(default_factory=dict)  # raw losses: "task", "fallback", "bbox", "<layer>.<name>"
    boxes: Optional[Tensor] = None  # (B, 4) the box tower's (x1, y1, x2, y2) in [0, 1] of the input; None without it
    layer_outputs: dict[str, MoEOutput] = field(default_factory=dict, repr=False)

    @property
    def route(self) -> RouteOutput:
        """The head layer's routing decision."""
        return self.routes[HEAD_LAYER]

    @property
    def expert_logits(self) -> Tensor:
        """(B, K, classes) logits of each of the head layer's routed experts, best first (zero where dropped)."""
        return self.layer_outputs[HEAD_LAYER].expert_outputs


def loss_weights(moe_config: MoEConfig, *overrides: dict[str, float], backbone_moe=None, tasks=None) -> dict[str, float]:
    """The weight of every loss, by name or glob pattern (``*.load_balance``): the defaults, then
    each of ``overrides`` in turn (a stage's own weights, then the user's ``loss_weights``).
    ``backbone_moe`` (``config.BackboneMoEConfig``) adds its soft constraint's weights, ``tasks``
    (``config.TasksConfig``) the box task's."""
    weights = dict(BASE_LOSS_WEIGHTS, **{"*.load_balance": moe_config.load_balance_weight,
                                         "*.z_loss": moe_config.z_loss_weight,
                                         "*.standalone": moe_config.expert_loss_weight,
                                         "*.diversity": moe_config.diversity_weight})
    soft = backbone_moe.constraint.soft if backbone_moe is not None else None
    if soft is not None:
        weights.update({"*.importance": soft.importance_weight, "*.load": soft.load_weight})
    if tasks is not None and tasks.bbox is not None:
        weights["bbox"] = tasks.bbox.loss_weight
    for extra in overrides:
        weights.update(extra)
    return weights


def loss_weight(name: str, weights: dict[str, float]) -> float:
    """A loss's weight: its exact name's, else the last matching glob pattern's, else 1."""
    if name in weights:
        return weights[name]
    matched = [w for pattern, w in weights.items() if fnmatch.fnmatchcase(name, pattern)]
    return matched[-1] if matched else 1.0


def weighted_loss(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """The training objective: sum of ``loss_weight(name) * loss`` (the one place losses are weighted)."""
    return sum(loss_weight(name, weights) * value for name, value in losses.items())


def expert_features(spec: ExpertSpec, info) -> frozenset[str]:
    """The backbone features an expert reads on this backbone (its substitute's, where declared).

    Every rank needs the union over all experts, including those it does not hold.
    """
    return frozenset(expert_class(spec.name).features_for(info, **spec.options))


def _seeded(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with the CPU generator seeded by ``seed``; the caller's generator state is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


class MGMoE(nn.Module):
    """Backbone -> router -> Top-K heterogeneous experts -> fused logits.

    Args:
        model_config: backbone, experts and their options.
        moe_config: routing and capacity settings.
        num_classes: number of species.
        expert_parallel_rank: this rank's index in its expert-parallel group; only its experts are
            built (``moe_config.expert_parallel_size`` of them in total across the group).
        cut_after: the backbone block after which a feature cache sits (``cache.depth``); the
            blocks above it form the ``backbone_top`` parameter group. None: the cache holds the
            backbone's outputs and ``backbone_top`` is empty.
    """

    def __init__(self, model_config: ModelConfig, moe_config: MoEConfig, num_classes: int,
                 expert_parallel_rank: int = 0, cut_after: Optional[int] = None) -> None:
        super().__init__()
        self.model_config = model_config
        self.num_classes = num_classes
        self.backbone = Backbone(model_config.backbone, pretrained=model_config.pretrained,
                                 img_size=model_config.img_size, cut_after=cut_after, **model_config.backbone_options)
        info = self.backbone.info
        self.expert_names = [spec.name for spec in model_config.experts]
        self.features = frozenset().union(*(expert_features(s, info) for s in model_config.experts))
        box_task = model_config.tasks.bbox
        # what the backbone computes per image (the box tower reads the final tokens)
        self.backbone_outputs = self.features | {ROUTER_INPUT} | ({BOX_FEATURE} if box_task is not None else set())
        # One seed drawn here, at any P, and expert e initialised from seed + e: every expert starts
        # from the same weights whichever rank builds it, so a run at P = 2 starts where P = 1 does.
        expert_seed = int(torch.randint(0, 2**62, (1,)))
        factories = [partial(_seeded, expert_seed + i,
                             partial(create_expert, spec.name, info=info, num_classes=num_classes, **spec.options))
                     for i, spec in enumerate(model_config.experts)]
        fallback = nn.Sequential(nn.LayerNorm(info.pooled_dim), nn.Linear(info.pooled_dim, num_classes))
        self.moe = layer_from_config(factories, moe_config, router_dim=info.pooled_dim, output_shape=(num_classes,),
                                     fallback_head=fallback, expert_parallel_rank=expert_parallel_rank)
        if model_config.backbone_moe is not None:
            # Drawn last, so that a model without backbone MoE layers initialises as before.
            install_token_moe(self.backbone.model, model_config.backbone_moe, seed=int(torch.randint(0, 2**40, (1,))),
                              expert_parallel_size=moe_config.expert_parallel_size,
                              expert_parallel_rank=expert_parallel_rank, dropless=moe_config.dropless,
                              cut_after=cut_after)
        self.box_tower: Optional[BoxTower] = None
        if box_task is not None:
            # Drawn last too: the box task leaves every other initial weight as it was.
            self.box_tower = _seeded(int(torch.randint(0, 2**40, (1,))), partial(
                BoxTower, info.token_dim, info.token_grid, channels=box_task.channels, grid=box_task.grid,
                hidden=box_task.hidden))
        self.fusion: Optional[FusionHead] = None
        if model_config.fusion is not None:  # drawn last as well: the other weights start as without it
            self.fusion = _seeded(int(torch.randint(0, 2**40, (1,))), partial(
                FusionHead, info.pooled_dim, len(self.expert_names), num_classes, hidden=model_config.fusion.hidden))

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    def moe_layers(self) -> dict[str, RoutedExperts]:
        """Every routed layer by its module path: the backbone's token-level layers, then the head."""
        return {name: module for name, module in self.named_modules() if isinstance(module, RoutedExperts)}

    def token_moe_layers(self) -> dict[str, TokenMoE]:
        """The backbone's token-level MoE layers by name (their block's path, "blocks.5.1")."""
        return token_moe_layers(self.backbone)

    def forward_features(self, images: Optional[Tensor] = None, *,
                         cached: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
        """Backbone features for the router and the experts: dict of (B, ...) tensors, from images
        or from a feature cache's entries (``cache_features``; at a cut, the backbone's top runs).

        An empty batch (a rank whose stream ran out while others still route) gets zero-row
        features of the right shapes, so the expert-parallel exchange still runs on every rank.
        """
        return self.forward_backbone(images, cached=cached)[0]

    def forward_backbone(self, images: Optional[Tensor] = None, *, cached: Optional[dict[str, Tensor]] = None,
                         routing: Routing = None) -> tuple[dict[str, Tensor], dict[str, TokenMoERecord]]:
        """``forward_features`` and what the backbone's token-level MoE layers did, by layer name."""
        with collect_token_moe(requests_by_name(routing)) as collector:
            if cached is not None:
                features = (self.backbone.forward_upper(cached, self.backbone_outputs) if CUT_KEY in cached
                            else cached)
            else:
                features = self._zero_rows_when_empty(partial(self.backbone, need=self.backbone_outputs), images)
        records = collector.records
        if images is not None and images.shape[0] == 0:
            # The layers ran on a stand-in image: their losses must not train anything.
            for record in records.values():
                record.losses = {name: 0.0 * value for name, value in record.losses.items()}
        return features, records

    @property
    def cached_feature_names(self) -> frozenset[str]:
        """What a feature cache stores: the backbone's outputs, or its lower part's at a cut."""
        if self.backbone.cut_after is None:
            return self.backbone_outputs
        return self.backbone.lower_features(self.backbone_outputs)

    def cache_features(self, images: Tensor) -> dict[str, Tensor]:
        """What a feature cache stores for ``images`` (``cached_feature_names``); ``forward_features(cached=...)``
        turns it into ``forward_features(images)``."""
        if self.backbone.cut_after is None:
            return self.forward_features(images)
        return self._zero_rows_when_empty(partial(self.backbone.forward_lower, need=self.backbone_outputs), images)

    def _zero_rows_when_empty(self, compute: Callable[[Tensor], dict[str, Tensor]], images: Tensor) -> dict[str, Tensor]:
        if images.shape[0] != 0:
            return compute(images)
        stand_in = images.new_zeros((1, *images.shape[1:]))
        exchanging = any(layer.routed.ep_size > 1 for layer in self.token_moe_layers().values())
        if not (exchanging and torch.is_grad_enabled()):
            with torch.no_grad():
                probe = compute(stand_in)
            return {name: value[:0] for name, value in probe.items()}
        # Expert-parallel layers inside the backbone: the stand-in's forward stays in the graph, so
        # its all-to-all runs in backward as on the other ranks (its features are sliced to zero
        # rows: no gradient). BatchNorm's running statistics must not learn the stand-in.
        statistics = [(buffer, buffer.clone()) for module in self.backbone.modules()
                      if isinstance(module, nn.modules.batchnorm._BatchNorm) for buffer in module.buffers()]
        probe = compute(stand_in)
        with torch.no_grad():
            for buffer, saved in statistics:
                buffer.copy_(saved)
        return {name: value[:0] for name, value in probe.items()}

    def forward_head(self, features: dict[str, Tensor], targets: Optional[Tensor] = None,
                     routing: Routing = None, *, boxes: Optional[Tensor] = None, has_box: Optional[Tensor] = None,
                     box_normaliser: Optional[float | Tensor] = None, sample_weights: Optional[Tensor] = None
                     ) -> ModelOutput:
        """Routes precomputed features (from ``forward_features`` or a feature cache).

        Args:
            features: ``forward_features`` output.
            targets: (B,) class indices, (B, classes) float32 class probabilities (Mixup/CutMix: the
                experts' own losses get each row's argmax), or None.
            routing: a ``RoutingRequest`` for every routed layer, or one per layer name; default
                Top-K with the configured K.
            boxes, has_box: (B, 4) true boxes ``(x1, y1, x2, y2)`` in [0, 1] and (B,) which images
                have one: with a box tower, the "bbox" loss (complete-IoU over the images with a box).
            box_normaliser: what the summed box loss is divided by (``box_tower.box_loss``);
                default this batch's number of boxes.
            sample_weights: optional (B,) each image's weight in the losses on its targets ("task",
                "fallback", the experts' standalone CE): ``sum_i w_i CE_i / B`` (``moe.losses``).
        """
        pooled = features[ROUTER_INPUT]  # (B, D)
        payload = {name: features[name] for name in self.features}
        labels = targets.argmax(dim=1) if targets is not None and targets.dim() == 2 else targets  # (B,) to experts
        out = self.moe(pooled, payload, labels, routing=request_for_layer(routing, HEAD_LAYER))
        losses = {f"{HEAD_LAYER}.{name}": value for name, value in out.aux_losses.items()}
        # the fusion head's logits once its stage has started (so in every later use of the model)
        fusing = self.fusion is not None and self.fusion.is_active
        logits = self.fusion(pooled, out.route, out.expert_outputs, out.output) if fusing else out.output  # (B, C)
        if targets is not None:
            losses["task"] = weighted_cross_entropy(logits, targets, sample_weights)
            losses["fallback"] = weighted_cross_entropy(self.moe.fallback_head(pooled), targets, sample_weights)
            losses.update(self._standalone_losses(out, targets, sample_weights))
            # logged at any weight; the experts each image ran: all of them in a dense stage, its K otherwise
            losses[f"{HEAD_LAYER}.diversity"] = diversity_loss(out.expert_outputs, out.route.kept)
        predicted_boxes = self.box_tower(features[BOX_FEATURE]) if self.box_tower is not None else None  # (B, 4)
        if predicted_boxes is not None and boxes is not None and has_box is not None:
            losses["bbox"] = box_loss(predicted_boxes, boxes, has_box, box_normaliser)
        return ModelOutput(logits=logits, routes={HEAD_LAYER: out.route}, pooled=pooled, losses=losses,
                           layer_outputs={HEAD_LAYER: out}, boxes=predicted_boxes)

    def forward(self, images: Optional[Tensor], targets: Optional[Tensor] = None, routing: Routing = None, *,
                features: Optional[dict[str, Tensor]] = None, boxes: Optional[Tensor] = None,
                has_box: Optional[Tensor] = None, box_normaliser: Optional[float | Tensor] = None,
                sample_weights: Optional[Tensor] = None) -> ModelOutput:
        """Full forward, or the head alone on precomputed features.

        Args:
            images: (B, 3, H, W), or None when ``features`` is given.
            targets: (B,) class indices, (B, classes) class probabilities, or None; see ``forward_head``.
            routing: see ``forward_head``.
            features: a feature cache's entries (``cache_features``): the backbone's outputs,
                or its lower part's at a cut (its top then runs). Passing them here rather than
                calling ``forward_head`` keeps the call inside a DeepSpeed engine's forward.
            boxes, has_box, box_normaliser, sample_weights: the box task's targets, the images'
                loss weights; see ``forward_head``.
        """
        backbone_features, records = self.forward_backbone(images, cached=features, routing=routing)
        out = self.forward_head(backbone_features, targets, routing, boxes=boxes, has_box=has_box,
                                box_normaliser=box_normaliser, sample_weights=sample_weights)
        for name, record in records.items():
            out.routes[name] = record.output.route
            out.layer_outputs[name] = record.output
            out.losses.update({f"{name}.{loss}": value for loss, value in record.losses.items()})
        return out

    @property
    def expert_labels(self) -> list[str]:
        """Each expert's name, or ``<name>_<id>`` when several experts share it (loss and export names)."""
        counts = Counter(self.expert_names)
        return [name if counts[name] == 1 else f"{name}_{e}" for e, name in enumerate(self.expert_names)]

    def _standalone_losses(self, out: MoEOutput, targets: Tensor, sample_weights: Optional[Tensor] = None
                           ) -> dict[str, Tensor]:
        """Each expert's CE on its own logits, over the images routed to it (its kept choices):
        ``<layer>.<expert>.standalone``. Every expert is then a classifier on its own, which is
        what the cluster teacher grades and what routing to one expert at a time relies on.

        Computed where the images are (their rank), each rank's mean over its own images: the
        gradient data parallelism gives, at any expert-parallel size.
        """
        means = expert_cross_entropy(out.expert_outputs, out.route.expert_indices, out.route.kept, targets,
                                     self.num_experts, sample_weights)  # (E,)
        return {f"{HEAD_LAYER}.{label}.standalone": means[e] for e, label in enumerate(self.expert_labels)}

    # -- parameter groups (the curriculum freezes and unfreezes by these names) ---------------

    def group_matcher(self) -> dict[str, Callable[[str], bool]]:
        """Which parameter (by name) belongs to which of ``config.PARAMETER_GROUPS``, first match
        wins, as timm's ``group_matcher`` does: the backbone's token-level MoE layers (routers and
        experts), the experts' classification heads (each expert
        names them), the rest of the experts, each routed layer's router and fallback head, the
        backbone's top above a cut, and the rest of the backbone."""
        names = {id(p): name for name, p in self.named_parameters()}
        heads = {names[id(p)] for expert in self.moe.local_experts for p in expert.head_parameters()}
        top = {names[id(p)] for module in self.backbone.top_modules() for p in module.parameters()}
        token_moe = {names[id(p)] for layer in self.token_moe_layers().values() for p in layer.parameters()}
        matchers = {
            "backbone_moe": token_moe.__contains__,
            "expert_heads": heads.__contains__,
            "backbone_top": top.__contains__,
            "experts": re.compile(r"(^|\.)deepspeed_moe\.experts\.").search,
            "router": re.compile(r"(^|\.)router\.").search,
            "fallback": re.compile(r"(^|\.)fallback_head\.").search,
            "box_tower": re.compile(r"^box_tower\.").search,
            "fusion": re.compile(r"^fusion\.").search,
            "backbone": re.compile(r"^backbone\.").search,
        }
        assert tuple(sorted(matchers)) == tuple(sorted(PARAMETER_GROUPS)), "one matcher per parameter group"
        return matchers

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``config.PARAMETER_GROUPS`` -> parameters, by ``group_matcher``.

        The same names on every rank whatever experts it holds (DeepSpeed's ZeRO runs one
        collective per group, so every rank needs the same group structure).
        """
        matchers = self.group_matcher()
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in PARAMETER_GROUPS}
        for name, param in self.named_parameters():
            group = next((g for g, matches in matchers.items() if matches(name)), None)
            if group is None:
                raise RuntimeError(f"parameter {name} is in no parameter group; extend MGMoE.group_matcher")
            groups[group].append(param)
        return groups

    def head_parameters_by_expert(self) -> dict[int, list[nn.Parameter]]:
        """Global expert id -> its classification head parameters, for this rank's experts."""
        return {global_id: list(expert.head_parameters())
                for global_id, expert in zip(self.moe.global_expert_ids, self.moe.local_experts)}

    # -- compute accounting ----------------------------------------------------------------------

    @torch.no_grad()
    def compute_report(self, batch_size: int = 4) -> dict[str, object]:
        """FLOPs per image (PyTorch's FLOP counter on the real modules) and parameter counts.

        Only valid in one process with every expert local (expert_parallel_size 1).
        """
        if self.moe.ep_size != 1:
            raise RuntimeError("compute_report needs every expert in this process (expert_parallel_size = 1)")
        was_training = self.training
        self.eval()
        size = self.model_config.img_size
        images = torch.randn(batch_size, 3, size, size, device=next(self.parameters()).device)
        features = self.forward_features(images)
        backbone_flops = count_flops(self.forward_features, images) / batch_size
        expert_flops = {}
        for global_id, expert in zip(self.moe.global_expert_ids, self.moe.local_experts):
            payload = {name: features[name] for name in expert_features(self.model_config.experts[global_id],
                                                                        self.backbone.info)}
            expert_flops[f"{global_id}:{self.expert_names[global_id]}"] = count_flops(expert, payload, None) / batch_size
        topk = count_flops(self.forward, images) / batch_size
        dense = count_flops(partial(self.forward, routing=RoutingRequest.dense()), images) / batch_size
        out = self.forward_head(features)
        chosen = out.route.expert_indices  # (B, K)
        expert_params = [count_parameters(e) for e in self.moe.local_experts]
        # A backbone MoE block's experts: K of E run on each token.
        token_experts = [(count_parameters(layer.routed.local_experts), layer.routed.top_k / layer.routed.num_experts)
                         for layer in self.token_moe_layers().values()]
        shared = count_parameters(self) - sum(expert_params) - sum(n for n, _ in token_experts)
        active = (shared + sum(n * fraction for n, fraction in token_experts)
                  + sum(expert_params[e] for e in chosen.flatten().tolist()) / batch_size)
        self.train(was_training)
        return {
            "flops_per_image": {"backbone": backbone_flops, "experts": expert_flops, "top_k": topk, "dense": dense},
            "parameters": {"total": count_parameters(self), "active_per_image": active, "backbone":
                           count_parameters(self.backbone), "experts": dict(zip(expert_flops, expert_params))},
            "top_k": self.moe.top_k,
        }
