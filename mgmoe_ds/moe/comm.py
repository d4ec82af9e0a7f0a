"""What the routed layer needs from its expert-parallel group, and the one-process stand-in.

``parallel.ExpertParallelComm`` is the real group (collectives over DeepSpeed's expert-parallel
process group); :class:`LocalComm` is a world of one without any process group, in which the
layer's math is identical. This module imports no ``torch.distributed``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class ExpertComm(Protocol):
    """What the layer needs from the expert-parallel group (see ``parallel.ExpertParallelComm``)."""

    size: int
    rank: int

    def max_int(self, value: int, device: torch.device) -> int: ...

    def exchange_counts(self, send_counts: Tensor) -> Tensor: ...

    def sum(self, x: Tensor) -> Tensor: ...

    def exchange(self, x: Tensor, output_splits: list[int], input_splits: list[int]) -> Tensor: ...


class LocalComm:
    """The single-process stand-in: every exchange returns its input."""

    size = 1
    rank = 0

    def max_int(self, value: int, device: torch.device) -> int:
        return value

    def exchange_counts(self, send_counts: Tensor) -> Tensor:
        return send_counts.reshape(1, -1)  # (1, E)

    def exchange(self, x: Tensor, output_splits: list[int], input_splits: list[int]) -> Tensor:
        return x

    def sum(self, x: Tensor) -> Tensor:
        return x
