"""MG-MoE: a shared timm backbone, a router on pooled features, and heterogeneous routed experts.

The backbone runs once per image; the features the configured experts need travel as each
image's payload to its Top-K experts (possibly on other ranks) and the fused logits are the
renormalised router weights times the expert logits. A shared fallback head on the pooled
features answers for an image that lost every expert to capacity; it is trained on every image
(its own loss) so that the answer is a real prediction. No ``torch.distributed`` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgmoe_ds.backbone import Backbone
from mgmoe_ds.config import ExpertSpec, ModelConfig, MoEConfig
from mgmoe_ds.experts import create_expert, expert_class
from mgmoe_ds.flops import count_flops, count_parameters
from mgmoe_ds.moe.layer import MoEOutput, RouteOutput, RoutingMode, layer_from_config

ROUTER_INPUT = "pooled"


@dataclass
class ModelOutput:
    """One forward of MG-MoE; every loss is returned here by name.

    A dataclass on purpose: DeepSpeed hooks the tensors (and tuples, lists, dicts of tensors) an
    engine's forward returns, and those hooks must not run inside the trainer's fixed-order
    backward (``train.distributed.fixed_order_loss``).
    """

    logits: Tensor  # (B, classes) fused logits
    route: RouteOutput  # routing weights, indices, capacity and drop counts
    pooled: Tensor  # (B, D) the router input (pooled backbone features)
    losses: dict[str, Tensor] = field(default_factory=dict)  # raw losses by name ("task" when targets given)
    aux_loss: Optional[Tensor] = None  # weighted sum of the router and expert losses
    moe_output: Optional[MoEOutput] = field(default=None, repr=False)

    @property
    def expert_logits(self) -> Tensor:
        """(B, K, classes) logits of each routed expert, best first (zero where dropped)."""
        return self.moe_output.expert_outputs


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
    """

    def __init__(self, model_config: ModelConfig, moe_config: MoEConfig, num_classes: int,
                 expert_parallel_rank: int = 0) -> None:
        super().__init__()
        self.model_config = model_config
        self.num_classes = num_classes
        self.backbone = Backbone(model_config.backbone, pretrained=model_config.pretrained,
                                 img_size=model_config.img_size, **model_config.backbone_options)
        info = self.backbone.info
        self.expert_names = [spec.name for spec in model_config.experts]
        self.features = frozenset().union(*(expert_features(s, info) for s in model_config.experts))
        # One seed drawn here, at any P, and expert e initialised from seed + e: every expert starts
        # from the same weights whichever rank builds it, so a run at P = 2 starts where P = 1 does.
        expert_seed = int(torch.randint(0, 2**62, (1,)))
        factories = [partial(_seeded, expert_seed + i,
                             partial(create_expert, spec.name, info=info, num_classes=num_classes, **spec.options))
                     for i, spec in enumerate(model_config.experts)]
        fallback = nn.Sequential(nn.LayerNorm(info.pooled_dim), nn.Linear(info.pooled_dim, num_classes))
        self.moe = layer_from_config(factories, moe_config, router_dim=info.pooled_dim, output_shape=(num_classes,),
                                     fallback_head=fallback, expert_parallel_rank=expert_parallel_rank)

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    def forward_features(self, images: Tensor) -> dict[str, Tensor]:
        """Backbone features for the router and the experts: dict of (B, ...) tensors.

        An empty batch (a rank whose stream ran out while others still route) gets zero-row
        features of the right shapes, so the expert-parallel exchange still runs on every rank.
        """
        need = self.features | {ROUTER_INPUT}
        if images.shape[0] == 0:
            with torch.no_grad():
                probe = self.backbone(images.new_zeros((1, *images.shape[1:])), need)
            return {name: value[:0] for name, value in probe.items()}
        return self.backbone(images, need)

    def forward_head(
        self,
        features: dict[str, Tensor],
        targets: Optional[Tensor] = None,
        *,
        mode: RoutingMode = "topk",
        top_k: Optional[int] = None,
        allowed_experts: Optional[Tensor] = None,
        single_expert: Optional[int] = None,
        uniform_weights: bool = False,
    ) -> ModelOutput:
        """Routes precomputed features (from ``forward_features`` or a feature cache)."""
        pooled = features[ROUTER_INPUT]  # (B, D)
        payload = {name: features[name] for name in self.features}
        out = self.moe(pooled, payload, targets, mode=mode, top_k=top_k, allowed_experts=allowed_experts,
                       single_expert=single_expert, uniform_weights=uniform_weights)
        losses = dict(out.aux_losses)
        if targets is not None:
            losses["task"] = F.cross_entropy(out.output.float(), targets)
            losses["fallback"] = F.cross_entropy(self.moe.fallback_head(pooled).float(), targets)
        return ModelOutput(logits=out.output, route=out.route, pooled=pooled, losses=losses, aux_loss=out.aux_loss,
                           moe_output=out)

    def forward(self, images: Optional[Tensor], targets: Optional[Tensor] = None,
                route_by: Optional[Callable[[Tensor], dict]] = None, *,
                features: Optional[dict[str, Tensor]] = None, **routing) -> ModelOutput:
        """Full forward, or the head alone on precomputed features.

        Args:
            images: (B, 3, H, W), or None when ``features`` is given.
            targets: (B,) class indices, or None.
            route_by: optional callable mapping the pooled features (B, D) to extra routing
                keyword arguments (e.g. per-image ``allowed_experts`` from cluster-level routing).
            features: precomputed ``forward_features`` output (a feature cache of a frozen
                backbone); the backbone is then skipped. Passing them here rather than calling
                ``forward_head`` keeps the call inside a DeepSpeed engine's forward.
            **routing: see ``forward_head``.
        """
        if features is None:
            features = self.forward_features(images)
        if route_by is not None:
            routing = dict(routing, **route_by(features[ROUTER_INPUT].detach()))
        return self.forward_head(features, targets, **routing)

    # -- parameter groups (the curriculum freezes and unfreezes by these names) ---------------

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups: backbone, router, fallback, experts (non-head), expert_heads.

        The same five names on every rank whatever experts it holds (DeepSpeed's ZeRO runs one
        collective per group, so every rank needs the same group structure).
        """
        heads = [p for params in self.head_parameters_by_expert().values() for p in params]
        head_ids = {id(p) for p in heads}
        return {
            "backbone": list(self.backbone.parameters()),
            "router": list(self.moe.router.parameters()),
            "fallback": list(self.moe.fallback_head.parameters()),
            "experts": [p for p in self.moe.local_experts.parameters() if id(p) not in head_ids],
            "expert_heads": heads,
        }

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
        dense = count_flops(partial(self.forward, mode="dense"), images) / batch_size
        out = self.forward_head(features)
        chosen = out.route.expert_indices  # (B, K)
        expert_params = [count_parameters(e) for e in self.moe.local_experts]
        shared = count_parameters(self) - sum(expert_params)
        active = shared + sum(expert_params[e] for e in chosen.flatten().tolist()) / batch_size
        self.train(was_training)
        return {
            "flops_per_image": {"backbone": backbone_flops, "experts": expert_flops, "top_k": topk, "dense": dense},
            "parameters": {"total": count_parameters(self), "active_per_image": active, "backbone":
                           count_parameters(self.backbone), "experts": dict(zip(expert_flops, expert_params))},
            "top_k": self.moe.top_k,
        }
