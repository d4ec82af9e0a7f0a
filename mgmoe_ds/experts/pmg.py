"""PMG expert (fine local parts): progressive multi-granularity heads with a feature-space jigsaw.

Three backbone levels each get a conv block and a classifier; a concat head classifies the
concatenated pooled levels; the prediction is the sum of the level and concat logits.

Substitute for the image jigsaw: the engine dispatches features, not images, so re-running the
backbone on jigsawed images is not possible inside an expert. In training we shuffle the n x n
blocks of each level's *feature map* instead (granularity 4/2/1 for level1/2/3 by default, reduced
to the largest n that divides the map, one permutation per batch) and classify the shuffled
maps. This is cheaper and weaker than PMG's image jigsaw (the receptive fields already saw the
unshuffled image), and is declared as such.

Norms are GroupNorm (conv blocks) and LayerNorm (classifiers) instead of PMG's BatchNorm, so a
routed batch of one image trains and statistics do not depend on which images were routed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgmoe_ds.backbone import BackboneInfo
from mgmoe_ds.experts import register_expert
from mgmoe_ds.experts.base import (AT_LEAST_ONE, NON_NEGATIVE, RATE, Expert, ExpertOptions, ExpertOutput, Segments,
                                   segment_mean, stochastic_depth)

PMG_LEVELS = ("level1", "level2", "level3")


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def effective_granularity(granularity: int, size: tuple[int, int]) -> int:
    """The largest n <= granularity that divides both sides of the map."""
    return max(g for g in range(1, max(1, granularity) + 1) if size[0] % g == 0 and size[1] % g == 0)


def feature_jigsaw(feature_map: Tensor, granularity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Shuffles the granularity x granularity blocks of a (n, C, H, W) map, one permutation per batch."""
    n, c, h, w = feature_map.shape
    g = granularity
    if g <= 1:
        return feature_map
    blocks = feature_map.reshape(n, c, g, h // g, g, w // g).permute(0, 2, 4, 1, 3, 5)  # (n, g, g, C, h/g, w/g)
    blocks = blocks.reshape(n, g * g, c, h // g, w // g)  # (n, g*g, C, h/g, w/g)
    order = torch.randperm(g * g, generator=generator, device="cpu").to(feature_map.device)
    blocks = blocks[:, order].reshape(n, g, g, c, h // g, w // g)
    return blocks.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)  # (n, C, H, W)


class LevelBlock(nn.Module):
    """1x1 conv -> D, norm, ReLU, 3x3 conv -> D', norm, ReLU, global max-pool: (n, C, H, W) -> (n, D')."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), _group_norm(mid_channels), nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), _group_norm(out_channels), nn.ReLU(),
        )

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.body(feature_map).amax(dim=(2, 3))  # (n, D')


def _classifier(in_dim: int, hidden: int, num_classes: int) -> nn.Sequential:
    # PMG's (BN, Linear, BN, ELU, Linear) with LayerNorm in place of BatchNorm1d.
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ELU(),
                         nn.Linear(hidden, num_classes))


@dataclass(frozen=True)
class PMGOptions(ExpertOptions):
    mid_channels: int = 128  # D, width after each level's 1x1 conv
    out_channels: int = 256  # D', width after the 3x3 conv (the pooled level feature)
    hidden: int = 256  # hidden width of each classifier
    granularities: tuple[int, int, int] = (4, 2, 1)  # jigsaw grid of level1..level3, reduced to divide the map
    level_weight: float = 1.0  # weight of each jigsawed level's CE (pmg.level1..pmg.level3)
    concat_weight: float = 1.0  # weight of the concat head's CE (pmg.concat)
    drop_path: float = 0.0  # stochastic depth: chance a level is dropped from the concat head's input (training)

    def validate(self) -> None:
        AT_LEAST_ONE.check(self, "mid_channels", "out_channels", "hidden", "granularities")
        NON_NEGATIVE.check(self, "level_weight", "concat_weight")
        RATE.check(self, "drop_path")


@register_expert("pmg")
class PMGExpert(Expert):
    """PMG head on ``level1``..``level3``.

    Stochastic depth (``drop_path``): the head has no residual branch; its three level branches
    join in the concat head, so there each level's pooled feature is dropped whole, per image and
    level independently, in training (drop-path at a join, as in FractalNet). Each level's own
    classifier still sees its level undropped.

    Args:
        info: the backbone's description.
        num_classes: classes to predict.
        **options: the fields of ``PMGOptions``.
    """

    required_features = frozenset(PMG_LEVELS)
    options_class = PMGOptions
    cached_training_note = ("its jigsaw shuffles the cached feature maps (the feature-space substitute it also "
                            "uses uncached); no raw image needed")

    def __init__(self, *, info: BackboneInfo, num_classes: int, mid_channels: int, out_channels: int, hidden: int,
                 granularities: tuple[int, ...], level_weight: float, concat_weight: float, drop_path: float):
        super().__init__()
        channels = info.level_channels[1:]
        self.granularities = tuple(granularities)
        self.level_weight, self.concat_weight = level_weight, concat_weight
        self.blocks = nn.ModuleList(LevelBlock(c, mid_channels, out_channels) for c in channels)
        self.level_heads = nn.ModuleList(_classifier(out_channels, hidden, num_classes) for _ in channels)
        self.concat_head = _classifier(out_channels * len(channels), hidden, num_classes)
        self.drop_path = stochastic_depth(drop_path)

    def forward(self, payload: dict[str, Tensor], targets: Optional[Tensor],
                segments: Segments = None) -> ExpertOutput:
        maps = [payload[k] for k in PMG_LEVELS]
        pooled = [block(m) for block, m in zip(self.blocks, maps)]  # 3 x (n, D')
        level_logits = [head(p) for head, p in zip(self.level_heads, pooled)]  # 3 x (n, classes)
        concat_logits = self.concat_head(torch.cat([self.drop_path(p) for p in pooled], dim=1))  # (n, classes)
        # The mean of the four heads (PMG sums them): one head's scale, like the other experts' logits,
        # so fusion weights and the cluster teacher compare like with like.
        logits = (torch.stack(level_logits, dim=0).sum(dim=0) + concat_logits) / (len(level_logits) + 1)
        aux = {}
        if targets is not None:
            for i, (m, block, head) in enumerate(zip(maps, self.blocks, self.level_heads)):
                g = effective_granularity(self.granularities[i], tuple(m.shape[2:])) if self.training else 1
                jig_logits = head(block(feature_jigsaw(m, g))) if g > 1 else level_logits[i]
                aux[f"pmg.{PMG_LEVELS[i]}"] = self.level_weight * segment_mean(
                    F.cross_entropy(jig_logits, targets, reduction="none"), segments)
            aux["pmg.concat"] = self.concat_weight * segment_mean(
                F.cross_entropy(concat_logits, targets, reduction="none"), segments)
        return ExpertOutput(logits=logits, aux_losses=aux)

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for head in (*self.level_heads, self.concat_head) for p in head.parameters()]
