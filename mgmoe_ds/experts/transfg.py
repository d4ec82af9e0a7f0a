"""TransFG expert (pose and deformation): part selection from the attention rollout.

On a ViT with a CLS token: per head, the patch with the largest CLS rollout weight (over the
first L-1 blocks, from the backbone's ``"rollout"``) is selected; those H tokens are gathered from
the hidden states entering the last block (``"pre_last"``), the CLS token is prepended, and one
transformer block initialised from the backbone's last block, a LayerNorm and a linear classifier
on CLS give the logits. Auxiliary loss: TransFG's contrastive loss on the L2-normalised CLS
features.

Substitute on backbones without CLS attention (Swin, CNNs): there is no rollout, so
the final ``"tokens"`` are first projected to the substitute's width ``dim`` (a CNN's last stage
is wide: 1280 channels on EfficientNet-Lite0, where a transformer block at full width would cost
more than the backbone), then ``num_queries`` learned queries attend (softmax over tokens) over
them; each query's attention-pooled token is a soft "selected part". A learned CLS token plus the
mean token is prepended, and a freshly initialised transformer block, LayerNorm and classifier
follow.
The selection is soft (differentiable) rather than TransFG's hard argmax; a log line says so once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mgmoe_ds.backbone import BackboneInfo
from mgmoe_ds.experts import ExpertError, register_expert
from mgmoe_ds.experts.base import (AT_LEAST_ONE, NON_NEGATIVE, RATE, Bound, Expert, ExpertOptions, ExpertOutput,
                                   Segments, segment_ids, stochastic_depth, zero_loss)

logger = logging.getLogger(__name__)
_substitute_logged = False


def select_parts(rollout: Tensor, pre_last: Tensor) -> Tensor:
    """Gathers, per head, the patch token with the largest rollout weight; prepends CLS.

    Args:
        rollout: (n, H, N) CLS rollout over patch tokens.
        pre_last: (n, 1 + N, C) CLS + patch tokens entering the last block.

    Returns:
        (n, 1 + H, C).
    """
    index = rollout.argmax(dim=-1)  # (n, H)
    patches = pre_last[:, 1:]  # (n, N, C)
    parts = torch.gather(patches, 1, index[:, :, None].expand(-1, -1, patches.shape[2]))  # (n, H, C)
    return torch.cat([pre_last[:, :1], parts], dim=1)  # (n, 1 + H, C)


def contrastive_loss(features: Tensor, targets: Tensor, margin: float, segments: Segments = None) -> Tensor:
    """TransFG's contrastive loss over distinct pairs: same class 1 - cos, else max(cos - margin, 0).

    Args:
        features: (n, C) CLS features.
        targets: (n,) class indices.
        margin: the cosine margin for different-class pairs (0.4 in TransFG).
        segments: rows per source rank (see ``experts.base``): pairs are formed within a segment
            only, and the per-segment means are summed.

    Returns:
        A scalar; zero (in the graph) when no segment has two rows.
    """
    n = features.shape[0]
    if n < 2:
        return zero_loss(features)
    with torch.autocast(device_type=features.device.type, enabled=False):
        # In fp32 whatever the autocast: under CUDA's bf16 autocast the row sums below would come
        # back in fp32 and the per-segment buffer in bf16 (index_add refuses the mix).
        return _contrastive_fp32(features.float(), targets, margin, segments)


def _contrastive_fp32(features: Tensor, targets: Tensor, margin: float, segments: Segments) -> Tensor:
    n = features.shape[0]
    unit = F.normalize(features, dim=-1)
    cosine = unit @ unit.T  # (n, n)
    same = targets[:, None] == targets[None, :]  # (n, n)
    pair_loss = torch.where(same, 1.0 - cosine, (cosine - margin).clamp(min=0.0))  # (n, n)
    ids = segment_ids(segments, n, features.device)  # (n,)
    pairs = (ids[:, None] == ids[None, :]) & ~torch.eye(n, dtype=torch.bool, device=features.device)  # (n, n)
    sizes = torch.bincount(ids, minlength=1 if segments is None else len(segments)).to(pair_loss.dtype)  # (S,)
    per_segment = pair_loss.new_zeros(sizes.shape[0]).index_add(0, ids, (pair_loss * pairs).sum(dim=1))  # (S,)
    return (per_segment / (sizes * (sizes - 1)).clamp_min(1)).sum()


def set_drop_path(block: nn.Module, rate: float) -> nn.Module:
    """Sets the stochastic depth of a timm transformer block's residual branches (its ``drop_path*``
    children: ``drop_path1``/``drop_path2`` on ``Block``) to ``rate``; returns the block."""
    names = [name for name, _ in block.named_children() if name.startswith("drop_path")]
    if not names and rate > 0:
        raise ExpertError(f"expert 'transfg': drop_path = {rate}: the backbone's last block ({type(block).__name__}) "
                          "has no drop_path branches; accepted: 0 on this backbone")
    for name in names:
        setattr(block, name, stochastic_depth(rate))
    return block


def _heads_for(dim: int) -> int:
    return next(h for h in (8, 4, 2, 1) if dim % h == 0)


@dataclass(frozen=True)
class TransFGOptions(ExpertOptions):
    contrastive_weight: float = 1.0  # weight of transfg.contrastive
    margin: float = 0.4  # cosine margin of the contrastive loss for different-class pairs
    num_queries: int = 4  # learned queries of the substitute (ignored on a ViT with CLS)
    dim: int = 256  # substitute's part-block width, the final tokens projected to it (ignored on a ViT with CLS)
    dropout: float = 0.0  # dropout before the classifier (training only)
    drop_path: float = 0.0  # stochastic depth of the part block's attention and MLP branches (training only)

    def validate(self) -> None:
        NON_NEGATIVE.check(self, "contrastive_weight")
        Bound("a number in [-1, 1]", lambda cosine: -1 <= cosine <= 1).check(self, "margin")
        AT_LEAST_ONE.check(self, "num_queries", "dim")
        RATE.check(self, "dropout", "drop_path")


@register_expert("transfg")
class TransFGExpert(Expert):
    """TransFG head: rollout part selection on a ViT with CLS; on Swin/CNNs, the declared substitute
    (learned queries attending over the final tokens, see the module docstring). On a ViT with CLS
    the part block is a copy of the backbone's last block, at the backbone's width.

    Stochastic depth (``drop_path``) on the part block's two residual branches (attention, MLP),
    per image, in training. On a ViT it replaces the rate the copied block had in the backbone
    (``model.backbone_options.drop_path_rate``): the expert's own option decides, 0 by default.

    Args:
        info: the backbone's description.
        num_classes: classes to predict.
        **options: the fields of ``TransFGOptions``.
    """

    required_features = frozenset({"rollout", "pre_last"})
    options_class = TransFGOptions

    @classmethod
    def features_for(cls, info: BackboneInfo, **options) -> frozenset[str]:
        return cls.required_features if info.has_cls else frozenset({"tokens"})

    def __init__(self, *, info: BackboneInfo, num_classes: int, contrastive_weight: float, margin: float,
                 num_queries: int, dim: int, dropout: float, drop_path: float):
        super().__init__()
        self.contrastive_weight, self.margin = contrastive_weight, margin
        self.uses_rollout = info.has_cls
        if self.uses_rollout:
            dim = info.token_dim
            self.part_block = set_drop_path(info.make_last_block(), drop_path)
        else:
            global _substitute_logged
            if not _substitute_logged:
                logger.info("transfg: backbone %s (%s) has no CLS attention; using %d learned queries over the "
                            "final tokens (projected %d -> %d) instead of the attention rollout", info.name,
                            info.family, num_queries, info.token_dim, dim)
                _substitute_logged = True
            self.required_features = self.features_for(info)
            self.project = nn.Sequential(nn.LayerNorm(info.token_dim), nn.Linear(info.token_dim, dim))
            self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)  # (Q, C)
            self.key = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.part_block = Block(dim, _heads_for(dim), qkv_bias=True, drop_path=drop_path)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def _substitute_parts(self, tokens: Tensor) -> Tensor:
        tokens = self.project(tokens)  # (n, N, token_dim) -> (n, N, C)
        keys = self.key(tokens)  # (n, N, C)
        scores = torch.einsum("qc,nkc->nqk", self.queries, keys) / math.sqrt(keys.shape[-1])  # (n, Q, N)
        parts = scores.softmax(dim=-1) @ tokens  # (n, Q, C)
        cls = self.cls_token + tokens.mean(dim=1, keepdim=True)  # (n, 1, C)
        return torch.cat([cls, parts], dim=1)  # (n, 1 + Q, C)

    def forward(self, payload: dict[str, Tensor], targets: Optional[Tensor],
                segments: Segments = None) -> ExpertOutput:
        if self.uses_rollout:
            sequence = select_parts(payload["rollout"], payload["pre_last"])  # (n, 1 + H, C)
        else:
            sequence = self._substitute_parts(payload["tokens"])  # (n, 1 + Q, C)
        cls = self.norm(self.part_block(sequence))[:, 0]  # (n, C)
        logits = self.head(self.drop(cls))
        aux = {}
        if targets is not None:
            aux["transfg.contrastive"] = self.contrastive_weight * contrastive_loss(cls, targets, self.margin, segments)
        return ExpertOutput(logits=logits, aux_losses=aux)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())
