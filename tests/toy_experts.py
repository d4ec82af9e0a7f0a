"""Small heterogeneous experts that follow the expert contract, for engine tests only."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgmoe_ds.experts.base import segment_mean

FEATURE_DIM = 8
NUM_CLASSES = 5


@dataclass
class ToyOutput:
    logits: Tensor
    aux_losses: dict = field(default_factory=dict)


class PooledMLP(nn.Module):
    """Reads the pooled vector; hidden width differs per expert (different parameter shapes)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURE_DIM, hidden), nn.GELU(), nn.Linear(hidden, NUM_CLASSES))

    def forward(self, payload: dict[str, Tensor], targets: Tensor | None, segments=None) -> ToyOutput:
        return ToyOutput(self.net(payload["pooled"]))


class MapConv(nn.Module):
    """Reads a (C, H, W) feature map; has its own mean-reduced auxiliary loss when targets are given
    (a mean, as the real experts' losses are, so that a 1/P scaling bug cannot hide in a sum)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(FEATURE_DIM, channels, 3, padding=1)
        self.head = nn.Linear(channels, NUM_CLASSES)

    def forward(self, payload: dict[str, Tensor], targets: Tensor | None, segments=None) -> ToyOutput:
        x = F.relu(self.conv(payload["level0"])).amax(dim=(2, 3))  # (n, channels)
        logits = self.head(x)
        per_row = None if targets is None else F.cross_entropy(logits, targets, reduction="none")  # (n,)
        aux = {} if per_row is None else {"mapconv.ce": 0.5 * segment_mean(per_row, segments)}
        return ToyOutput(logits, aux)


def expert_factories(seed: int = 100) -> list:
    """Four experts of different architectures; each built with its own seed (same weights on any rank)."""

    def make(index: int, build):
        def factory():
            torch.manual_seed(seed + index)
            return build()
        return factory

    builders = [lambda: PooledMLP(4), lambda: MapConv(6), lambda: PooledMLP(16), lambda: MapConv(3)]
    return [make(i, b) for i, b in enumerate(builders)]


def make_batch(num_tokens: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(pooled (T, D), level0 (T, D, 4, 4), targets (T,))."""
    g = torch.Generator().manual_seed(seed)
    level0 = torch.randn(num_tokens, FEATURE_DIM, 4, 4, generator=g)
    pooled = level0.mean(dim=(2, 3))
    targets = torch.randint(0, NUM_CLASSES, (num_tokens,), generator=g)
    return pooled, level0, targets
