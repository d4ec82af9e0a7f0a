"""Turning chosen blocks of a timm backbone into token-level MoE blocks, upcycled from their weights.

Each supported block has one per-token sublayer that becomes a ``TokenMoE`` whose experts start as
copies of it (plus noise):

    timm ViT ``Block``                 ``mlp`` (fc1 -> act -> fc2), on (B, N, C) tokens, CLS included
    EfficientNet ``InvertedResidual``  ``conv_pwl`` + ``bn3``: the 1x1 projection, BN folded in
    EfficientNet ``DepthwiseSeparableConv``  ``conv_pw`` + ``bn2``, likewise
    ResNet ``Bottleneck``              ``conv3`` + ``bn3``, likewise

A CNN block's depthwise or 3x3 convolution mixes neighbouring positions, so it stays shared; the
projection after it acts on each position alone and is what the experts replace. Its BatchNorm is
folded into the experts' bias with its running statistics (a BN over routed subsets of tokens
would see a different batch per expert). A token that loses every expert to capacity gets zero
from the layer, and the block's skip connection carries it on, so a CNN block without a skip
connection needs dropless routing.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from mgmoe_ds.backbone_weights import BackboneError
from mgmoe_ds.moe.token_layer import BatchedRoutedExperts, TokenMoE


@dataclass
class _Site:
    """Where a block's per-token sublayer sits and what it computes."""

    replace: str  # attribute of the block that becomes the TokenMoE
    identity: Optional[str]  # attribute replaced by nn.Identity (a BN folded into the experts)
    layout: str  # "tokens" or "channels_first"
    linears: list[tuple[Tensor, Optional[Tensor]]]  # the dense layers: (weight (out, in), bias)
    activation: Optional[Callable[[Tensor], Tensor]]  # between the layers
    has_skip: bool


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """A 1x1 convolution followed by an eval-mode BatchNorm as one linear map: (out, in), (out,)."""
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.stride != (1, 1):
        raise BackboneError(f"expected a 1x1 convolution with stride 1 and one group, got {conv}")
    act = getattr(bn, "act", None)
    if act is not None and not isinstance(act, nn.Identity):
        raise BackboneError(f"the projection's norm applies an activation ({type(act).__name__}); cannot fold it")
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # (out,)
    weight = conv.weight.detach()[:, :, 0, 0] * scale[:, None]  # (out, in)
    conv_bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(scale)
    bias = bn.bias.detach() + (conv_bias - bn.running_mean) * scale  # (out,)
    return weight, bias


def _site(block: nn.Module) -> Optional[_Site]:
    """The block's per-token sublayer, or None when the block type is not supported."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.resnet import Bottleneck
    from timm.models.vision_transformer import Block

    if isinstance(block, Block) and all(hasattr(block.mlp, a) for a in ("fc1", "act", "fc2")):
        mlp = block.mlp
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise BackboneError("a ViT MLP with a norm between its layers is not supported")
        return _Site("mlp", None, "tokens", [(mlp.fc1.weight, mlp.fc1.bias), (mlp.fc2.weight, mlp.fc2.bias)],
                     mlp.act, True)
    if isinstance(block, InvertedResidual):
        return _Site("conv_pwl", "bn3", "channels_first", [_fold_conv_bn(block.conv_pwl, block.bn3)], None,
                     block.has_skip)
    if isinstance(block, DepthwiseSeparableConv):
        return _Site("conv_pw", "bn2", "channels_first", [_fold_conv_bn(block.conv_pw, block.bn2)], None,
                     block.has_skip)
    if isinstance(block, Bottleneck):
        return _Site("conv3", "bn3", "channels_first", [_fold_conv_bn(block.conv3, block.bn3)], None, True)
    return None


def supported_blocks(model: nn.Module) -> list[str]:
    """Module paths of the blocks that can become MoE blocks, in forward order (their indices)."""
    return [name for name, module in model.named_modules() if name and _site(module) is not None]


def resolve_blocks(model: nn.Module, blocks: list[Any]) -> list[str]:
    """``model.backbone_moe.blocks`` (indices or module paths) -> module paths, one-line errors."""
    candidates = supported_blocks(model)
    if not candidates:
        raise BackboneError(f"mgmoe.model.backbone_moe: {type(model).__name__} has no supported block (a timm ViT "
                            f"Block, EfficientNet InvertedResidual/DepthwiseSeparableConv, ResNet Bottleneck)")
    names = []
    for block in blocks:
        if isinstance(block, int):
            if block >= len(candidates):
                raise BackboneError(f"mgmoe.model.backbone_moe.blocks: index {block} is out of range; this backbone "
                                    f"has supported blocks 0..{len(candidates) - 1}")
            names.append(candidates[block])
        elif block in candidates:
            names.append(block)
        else:
            shown = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
            raise BackboneError(f"mgmoe.model.backbone_moe.blocks: {block!r} is not a supported block of this "
                                f"backbone; supported: {shown} (or their indices 0..{len(candidates) - 1})")
    return names


def install_token_moe(model: nn.Module, config: Any, *, seed: int, expert_parallel_size: int = 1,
                      expert_parallel_rank: int = 0, dropless: bool = False,
                      cut_after: Optional[int] = None) -> dict[str, TokenMoE]:
    """Replaces the chosen blocks' per-token sublayers by upcycled ``TokenMoE`` layers, in place.

    Args:
        model: the timm model (``Backbone.model``), pretrained weights already loaded.
        config: ``config.BackboneMoEConfig``.
        seed: one seed for the whole model (the same on every rank): each layer's router starts
            from ``seed`` and its index, each expert's noise from its global id, so every rank
            and every expert-parallel size builds the same layers.
        expert_parallel_size, expert_parallel_rank: placement; this rank builds E / P experts.
        dropless: no capacity limit (inference).
        cut_after: the feature cache's cut (EfficientNet stage); MoE blocks must lie above it.

    Returns:
        The layers by name (the block's module path).
    """
    layers = {}
    for index, name in enumerate(resolve_blocks(model, list(config.blocks))):
        if cut_after is not None and name.startswith("blocks.") and int(name.split(".")[1]) <= cut_after:
            raise BackboneError(f"mgmoe.model.backbone_moe.blocks: {name!r} lies below the feature cache's cut "
                                f"(mgmoe.cache.depth = {cut_after}); MoE blocks must be in blocks.{cut_after + 1} or above")
        block = model.get_submodule(name)
        site = _site(block)
        if not site.has_skip and not dropless:
            raise BackboneError(f"mgmoe.model.backbone_moe.blocks: {name!r} has no skip connection, so a token dropped "
                                f"for capacity would lose the block's output; choose a block with a residual")
        widths = [site.linears[0][0].shape[1]] + [weight.shape[0] for weight, _ in site.linears]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919 * index)  # the router's init, whatever P is
            routed = BatchedRoutedExperts(
                config.num_experts, widths, activation=site.activation, backend=config.backend,
                router_dim=widths[0], top_k=config.top_k, capacity_factor=config.capacity_factor,
                eval_capacity_factor=config.eval_capacity_factor, min_capacity=config.min_capacity,
                dropless=dropless, expert_parallel_size=expert_parallel_size,
                expert_parallel_rank=expert_parallel_rank)
        layer_seed = seed + zlib.crc32(name.encode())
        routed.local_experts.upcycle(site.linears, config.upcycle_noise,
                                     [layer_seed + 104729 * g for g in routed.global_expert_ids])
        constraint = config.constraint
        layer = TokenMoE(name, routed, layout=site.layout, granularity=config.granularity,
                         soft=constraint.soft is not None,
                         hard_threshold=constraint.hard.threshold if constraint.hard is not None else None,
                         hard_momentum=constraint.hard.momentum if constraint.hard is not None else 0.9,
                         hard_at_eval=constraint.hard.at_eval if constraint.hard is not None else True)
        setattr(block, site.replace, layer)
        if site.identity is not None:
            setattr(block, site.identity, nn.Identity())
        layers[name] = layer
    return layers

