"""Collectives for expert parallelism: variable-size all-to-all over the expert-parallel group.

Only ``all_to_all_single`` is used (gloo has no list form). At world size 1 (``group`` is None)
every function returns its input, so the layer's math is identical with and without a process
group.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAllSingle(torch.autograd.Function):
    """Differentiable ``all_to_all_single``: the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))  # (sum(recv), *trailing)
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        back = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))  # (sum(sent), *trailing)
        dist.all_to_all_single(back, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return back, None, None, None


class ExpertParallelComm:
    """The expert-parallel group and the exchanges the routed layer needs.

    Args:
        group: the expert-parallel process group (DeepSpeed's ``ep_size_P`` group), or None for
            a single process.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)

    def max_int(self, value: int, device: torch.device) -> int:
        """The largest ``value`` over the group (so every rank agrees on capacity)."""
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def sum(self, x: Tensor) -> Tensor:
        """``x`` summed over the group (a new tensor; not differentiable)."""
        if self.group is None:
            return x
        total = x.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def exchange_counts(self, send_counts: Tensor) -> Tensor:
        """Sends ``send_counts`` (P*L,) rows-per-expert; returns (P, L) rows from each source rank.

        Row p of the result holds how many rows source rank p sends to each of this rank's L
        local experts.
        """
        if self.group is None:
            return send_counts.reshape(1, -1)  # (1, E)
        recv = torch.empty_like(send_counts)  # (P*L,)
        dist.all_to_all_single(recv, send_counts.contiguous(), group=self.group)
        return recv.reshape(self.size, -1)  # (P, L)

    def exchange(self, x: Tensor, output_splits: list[int], input_splits: list[int]) -> Tensor:
        """Differentiable variable-size all-to-all of rows of ``x``."""
        if self.group is None:
            return x
        return _AllToAllSingle.apply(x, output_splits, input_splits, self.group)
