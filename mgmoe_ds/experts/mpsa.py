"""MPSA expert (global structure): multi-granularity part sampling attention.

Per backbone level i, tokens are softly assigned to P_i parts (softmax over tokens), the parts
are pooled, and the last level's tokens attend over each level's parts (part-sampling
attention). A squeeze-excitation over the parts scores their importance; the attention-weighted
importance gives each query token a weight, used to pool the fused features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgmoe_ds.backbone import LEVEL_KEYS, BackboneInfo
from mgmoe_ds.experts import register_expert
from mgmoe_ds.experts.base import (AT_LEAST_ONE, RATE, Expert, ExpertOptions, ExpertOutput, Segments, map_to_tokens,
                                   segment_mean, stochastic_depth)


class PartAssignment(nn.Module):
    """LayerNorm, Linear(C -> P), GELU, plus a learnable position term: soft token-to-part assignment.

    The position term lives on the level's (H, W) grid and is resized if the map size changes.
    """

    def __init__(self, channels: int, num_parts: int, grid: tuple[int, int]):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.assign = nn.Linear(channels, num_parts)
        self.act = nn.GELU()
        self.position = nn.Parameter(torch.zeros(1, num_parts, *grid))  # (1, P, H, W)

    def forward(self, feature_map: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (parts (n, P, C), tokens (n, S, C)) for a (n, C, H, W) map."""
        tokens = map_to_tokens(feature_map)  # (n, S, C)
        position = self.position
        if position.shape[2:] != feature_map.shape[2:]:
            position = F.interpolate(position, size=feature_map.shape[2:], mode="bilinear", align_corners=False)
        logits = self.act(self.assign(self.norm(tokens))) + map_to_tokens(position)  # (n, S, P)
        assignment = logits.softmax(dim=1)  # (n, S, P), each part a distribution over tokens
        parts = assignment.transpose(1, 2) @ tokens  # (n, P, C)
        return parts, tokens


class PartSamplingAttention(nn.Module):
    """Queries from last-level tokens, keys/values from one level's parts, learnable part bias.

    Random part dropout masks whole parts in training only (the reference applies it at test
    time too; we do not).
    """

    def __init__(self, query_dim: int, part_dim: int, dim: int, num_parts: int, part_drop: float, se_reduction: int):
        super().__init__()
        self.query = nn.Sequential(nn.LayerNorm(query_dim), nn.Linear(query_dim, dim))
        self.key = nn.Linear(part_dim, dim)
        self.value = nn.Linear(part_dim, dim)
        self.bias = nn.Parameter(torch.zeros(num_parts))  # (P,)
        self.part_drop = part_drop
        hidden = max(1, num_parts // se_reduction)
        self.excite = nn.Sequential(nn.Linear(num_parts, hidden), nn.ReLU(), nn.Linear(hidden, num_parts), nn.Sigmoid())
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, queries: Tensor, parts: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (features (n, S, D), token weights (n, S)) for queries (n, S, Cq), parts (n, P, C)."""
        q = self.query(queries)  # (n, S, D)
        k, v = self.key(parts), self.value(parts)  # (n, P, D)
        logits = (q @ k.transpose(1, 2)) * self.scale + self.bias  # (n, S, P)
        if self.training and self.part_drop > 0:
            draw = torch.rand(parts.shape[0], parts.shape[1], device=parts.device)  # (n, P)
            dropped = draw < self.part_drop
            dropped.scatter_(1, draw.argmax(dim=1, keepdim=True), False)  # keep at least one part
            logits = logits.masked_fill(dropped[:, None, :], float("-inf"))
        attention = logits.softmax(dim=-1)  # (n, S, P)
        importance = self.excite(v.mean(dim=-1))  # (n, P): squeeze each part to a scalar, excite
        weights = attention @ importance[:, :, None]  # (n, S, 1)
        return attention @ v, weights.squeeze(-1)  # (n, S, D), (n, S)


@dataclass(frozen=True)
class MPSAOptions(ExpertOptions):
    num_parts: tuple[int, int, int, int] = (16, 8, 8, 4)  # parts per level, shallow to deep (more = finer)
    dim: int = 128  # width of the part-sampling attention
    part_drop: float = 0.1  # probability of dropping a part in training
    se_reduction: int = 2  # squeeze-excitation reduction over the parts
    dropout: float = 0.1  # dropout on the fused features (training only)
    label_smoothing: float = 0.0  # > 0 adds mpsa.label_smoothing (see MPSAExpert); 0: no own loss
    drop_path: float = 0.0  # stochastic depth: chance that one level's branch is dropped for an image (training only)

    def validate(self) -> None:
        AT_LEAST_ONE.check(self, "num_parts", "dim", "se_reduction")
        RATE.check(self, "part_drop", "dropout", "label_smoothing", "drop_path")


@register_expert("mpsa")
class MPSAExpert(Expert):
    """MPSA head over the four backbone levels.

    With ``label_smoothing`` > 0 it adds ``mpsa.label_smoothing`` = label-smoothed CE minus plain CE
    of this expert's logits, i.e. the part of MPSA's loss the model's fused CE lacks. At 0 (the
    default) it adds no auxiliary loss: the model's CE on fused logits already trains it.

    Stochastic depth (``drop_path``): the head has no residual branch; its four levels are
    parallel branches joined by concatenation, so each level's attended features are dropped
    whole, per image and level independently, in training (drop-path at a join, as in
    FractalNet); the pooling weights are kept.

    Args:
        info: the backbone's description.
        num_classes: classes to predict.
        **options: the fields of ``MPSAOptions``.
    """

    required_features = frozenset(LEVEL_KEYS)
    options_class = MPSAOptions

    def __init__(self, *, info: BackboneInfo, num_classes: int, num_parts: tuple[int, ...], dim: int,
                 part_drop: float, se_reduction: int, dropout: float, label_smoothing: float, drop_path: float):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.assignments = nn.ModuleList(
            PartAssignment(c, p, size) for c, p, size in zip(info.level_channels, num_parts, info.level_sizes)
        )
        query_dim = info.level_channels[-1]
        self.attentions = nn.ModuleList(
            PartSamplingAttention(query_dim, c, dim, p, part_drop, se_reduction)
            for c, p in zip(info.level_channels, num_parts)
        )
        self.drop_path = stochastic_depth(drop_path)
        fused = dim * len(LEVEL_KEYS)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(fused)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(fused, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, payload: dict[str, Tensor], targets: Optional[Tensor],
                segments: Segments = None) -> ExpertOutput:
        queries = map_to_tokens(payload[LEVEL_KEYS[-1]])  # (n, S, C3)
        stage_features, stage_weights = [], []
        for key, assignment, attention in zip(LEVEL_KEYS, self.assignments, self.attentions):
            parts, _ = assignment(payload[key])  # (n, P_i, C_i)
            features, weights = attention(queries, parts)  # (n, S, D), (n, S)
            stage_features.append(self.drop_path(features))  # a fresh draw per level
            stage_weights.append(weights)
        fused = self.drop(self.norm(self.act(torch.cat(stage_features, dim=-1))))  # (n, S, 4D)
        weights = torch.stack(stage_weights, dim=0).sum(dim=0)  # (n, S), positive
        weights = weights / weights.sum(dim=1, keepdim=True)
        pooled = (weights[:, :, None] * fused).sum(dim=1)  # (n, 4D)
        logits = self.head(pooled)  # (n, classes)
        aux = {}
        if targets is not None and self.label_smoothing > 0:
            smoothed = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing, reduction="none")
            aux["mpsa.label_smoothing"] = segment_mean(smoothed - F.cross_entropy(logits, targets, reduction="none"),
                                                       segments)
        return ExpertOutput(logits=logits, aux_losses=aux)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())
