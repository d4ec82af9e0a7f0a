"""PIM expert (cluttered scenes): FPN over four levels, token selection with background suppression,
and a graph combiner over the selected tokens.

The expert's logits are the combiner's logits (PIM's test-time prediction); the per-level
token classifiers feed only the auxiliary losses.

PIM's BatchNorm1d in the combiner is replaced by LayerNorm so a routed batch of one image trains.
The combiner pools the selected tokens to a few nodes with learned queries (softmax over tokens)
instead of PIM's Conv1d over a fixed token count, so it does not depend on the input size.
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
from mgmoe_ds.experts.base import (AT_LEAST_ONE, NON_NEGATIVE, RATE, Bound, Expert, ExpertOptions, ExpertOutput,
                                   Segments, map_to_tokens, segment_mean, segment_ratio, stochastic_depth)


def select_tokens(features: Tensor, token_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keeps the k tokens with the largest max softmax probability, per image, vectorised.

    Args:
        features: (n, S, D) token features.
        token_logits: (n, S, classes) per-token logits.
        k: tokens to keep per image, 1 <= k <= S.

    Returns:
        (selected (n, k, D), dropped (n, S) bool mask of the tokens not kept).
    """
    confidence = token_logits.detach().softmax(dim=-1).amax(dim=-1)  # (n, S)
    index = confidence.topk(k, dim=1).indices  # (n, k)
    selected = torch.gather(features, 1, index[:, :, None].expand(-1, -1, features.shape[2]))  # (n, k, D)
    dropped = torch.ones_like(confidence, dtype=torch.bool).scatter_(1, index, False)  # (n, S)
    return selected, dropped


class GraphCombiner(nn.Module):
    """Pools selected tokens to nodes, one graph convolution with learned + data-dependent adjacency, pools.

    The graph convolution is a residual branch; ``drop_path`` is its stochastic depth.
    """

    def __init__(self, dim: int, num_nodes: int, num_classes: int, dropout: float, drop_path: float = 0.0):
        super().__init__()
        self.node_queries = nn.Parameter(torch.randn(num_nodes, dim) * 0.02)  # (M, D)
        self.adjacency = nn.Parameter(torch.eye(num_nodes) / num_nodes)  # (M, M), static part
        hidden = max(1, dim // 4)
        self.node_query = nn.Linear(dim, hidden)
        self.node_key = nn.Linear(dim, hidden)
        self.alpha = nn.Parameter(torch.zeros(1))  # weight of the data-dependent adjacency, as in PIM
        self.update = nn.Linear(dim, dim)
        self.drop_path = stochastic_depth(drop_path)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """(n, K, D) selected tokens -> (n, classes)."""
        scale = 1.0 / math.sqrt(tokens.shape[-1])
        pool = torch.einsum("md,nkd->nkm", self.node_queries, tokens).mul(scale).softmax(dim=1)  # (n, K, M)
        nodes = pool.transpose(1, 2) @ tokens  # (n, M, D)
        q, k = self.node_query(nodes), self.node_key(nodes)  # (n, M, h)
        dynamic = torch.tanh(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]))  # (n, M, M)
        adjacency = self.adjacency + self.alpha * dynamic  # (n, M, M)
        nodes = self.norm(nodes + self.drop_path(F.relu(self.update(adjacency @ nodes))))  # (n, M, D)
        return self.head(self.drop(nodes.mean(dim=1)))  # (n, classes)


@dataclass(frozen=True)
class PIMOptions(ExpertOptions):
    dim: int = 128  # FPN width D
    select_ratio: float = 0.25  # fraction of each level's tokens the selector keeps (at least 1)
    num_selects: Optional[tuple[int, int, int, int]] = None  # tokens kept per level; overrides select_ratio
    num_nodes: int = 4  # graph nodes in the combiner
    dropout: float = 0.1  # combiner dropout (training only)
    level_weight: float = 0.5  # weight of the sum over levels of CE(mean token logits) (pim.levels)
    suppression_weight: float = 5.0  # weight of MSE(tanh(dropped logits), -1) (pim.suppression)
    # weight of CE(combiner logits) (pim.combiner), on top of the standalone CE every expert gets on its own
    # logits (moe.expert_loss_weight), which for PIM is the same loss: 0 by default, so it is not counted twice
    combiner_weight: float = 0.0
    drop_path: float = 0.0  # stochastic depth of the FPN's top-down adds and the graph convolution (training only)

    def validate(self) -> None:
        AT_LEAST_ONE.check(self, "dim", "num_selects", "num_nodes")
        Bound("a number in (0, 1]", lambda ratio: 0 < ratio <= 1).check(self, "select_ratio")
        RATE.check(self, "dropout", "drop_path")
        NON_NEGATIVE.check(self, "level_weight", "suppression_weight", "combiner_weight")


@register_expert("pim")
class PIMExpert(Expert):
    """PIM head over the four backbone levels.

    Stochastic depth (``drop_path``) on its residual branches, per image, in training: each FPN
    level's top-down add (the deeper map added to the level's own) and the combiner's graph
    convolution (added to the nodes); the same rate on each, these heads being shallow.

    Args:
        info: the backbone's description.
        num_classes: classes to predict.
        **options: the fields of ``PIMOptions``.
    """

    required_features = frozenset(LEVEL_KEYS)
    options_class = PIMOptions

    def __init__(self, *, info: BackboneInfo, num_classes: int, dim: int, select_ratio: float,
                 num_selects: Optional[tuple[int, ...]], num_nodes: int, dropout: float, level_weight: float,
                 suppression_weight: float, combiner_weight: float, drop_path: float):
        super().__init__()
        self.select_ratio, self.num_selects = select_ratio, num_selects
        self.level_weight, self.suppression_weight, self.combiner_weight = level_weight, suppression_weight, combiner_weight
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(c, dim), nn.ReLU(), nn.Linear(dim, dim)) for c in info.level_channels
        )
        self.token_heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in LEVEL_KEYS)
        self.combiner = GraphCombiner(dim, num_nodes, num_classes, dropout, drop_path)
        self.drop_path = stochastic_depth(drop_path)

    def selects_for(self, level: int, num_tokens: int) -> int:
        if self.num_selects is not None:
            return max(1, min(num_tokens, int(self.num_selects[level])))
        return max(1, min(num_tokens, round(self.select_ratio * num_tokens)))

    def pyramid(self, payload: dict[str, Tensor]) -> list[Tensor]:
        """FPN: per-level MLP to D, then a top-down add (deeper map resized onto the shallower)."""
        maps = []
        for key, projection in zip(LEVEL_KEYS, self.projections):
            feature_map = payload[key]
            projected = projection(map_to_tokens(feature_map))  # (n, S_i, D)
            maps.append(projected.transpose(1, 2).reshape(feature_map.shape[0], -1, *feature_map.shape[2:]))
        for i in range(len(maps) - 2, -1, -1):
            deeper = F.interpolate(maps[i + 1], size=maps[i].shape[2:], mode="bilinear", align_corners=False)
            maps[i] = maps[i] + self.drop_path(deeper)  # (n, D, H_i, W_i)
        return [map_to_tokens(m) for m in maps]  # 4 x (n, S_i, D)

    def forward(self, payload: dict[str, Tensor], targets: Optional[Tensor],
                segments: Segments = None) -> ExpertOutput:
        levels = self.pyramid(payload)
        selected, level_ce, suppression = [], [], []
        for i, (tokens, head) in enumerate(zip(levels, self.token_heads)):
            token_logits = head(tokens)  # (n, S_i, classes)
            kept, dropped = select_tokens(tokens, token_logits, self.selects_for(i, tokens.shape[1]))
            selected.append(kept)
            if targets is not None:
                level_ce.append(segment_mean(F.cross_entropy(token_logits.mean(dim=1), targets, reduction="none"), segments))
                per_token = (torch.tanh(token_logits) + 1.0).pow(2).mean(dim=-1)  # (n, S_i)
                suppression.append(segment_ratio((per_token * dropped).sum(dim=1), dropped.sum(dim=1).to(per_token.dtype),
                                                 segments))
        logits = self.combiner(torch.cat(selected, dim=1))  # (n, classes)
        aux = {}
        if targets is not None:
            aux["pim.levels"] = self.level_weight * torch.stack(level_ce).sum()
            aux["pim.suppression"] = self.suppression_weight * torch.stack(suppression).mean()
            if self.combiner_weight:
                aux["pim.combiner"] = self.combiner_weight * segment_mean(
                    F.cross_entropy(logits, targets, reduction="none"), segments)
        return ExpertOutput(logits=logits, aux_losses=aux)

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for head in (*self.token_heads, self.combiner.head) for p in head.parameters()]
