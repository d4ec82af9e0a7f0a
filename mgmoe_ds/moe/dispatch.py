"""Capacity, slot assignment and index-based dispatch/combine. No collectives here.

Tokens are dispatched by sorting their (token, choice) assignments by expert id and gathering
payload rows, never with the dense one-hot ``sec,sm->ecm`` einsum whose memory grows with
tokens x experts x capacity. Payloads may be any tensor shapes; a dict of payload tensors is
packed into one flat buffer per dtype for the exchange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int) -> int:
    """Slots per expert for one rank's batch: ``max(min_capacity, ceil(factor * tokens * K / E))``.

    Args:
        num_tokens: tokens in the batch (use the largest batch in the expert-parallel group so
            that every rank agrees on the capacity).
        num_experts: E.
        top_k: K.
        capacity_factor: > 0.
        min_capacity: >= 1.
    """
    return max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


@dataclass
class SlotAssignment:
    """Which (token, choice) assignments keep their expert under the capacity limit."""

    kept: Tensor  # (T, K) bool
    weights: Tensor  # (T, K) fp32 combine weights renormalised over the kept choices; 0 where dropped
    dropped_per_expert: Tensor  # (E,) int64 assignments dropped for capacity
    load_per_expert: Tensor  # (E,) int64 assignments requested before capacity
    fully_dropped: Tensor  # (T,) bool tokens that lost every choice


def assign_slots(expert_indices: Tensor, weights: Tensor, num_experts: int, capacity: Optional[int],
                 priority: Optional[Tensor] = None, renormalise: bool = True) -> SlotAssignment:
    """Fills each expert's slots in priority order and renormalises the surviving weights.

    Order: all first choices before any second choice (GShard); within a choice rank, tokens in
    batch order, or by descending ``priority`` (Batch Prioritized Routing: the least confident
    tokens are dropped first).

    Args:
        expert_indices: (T, K) chosen experts.
        weights: (T, K) renormalised router weights of the choices.
        num_experts: E.
        capacity: slots per expert, or None for no limit (dropless).
        priority: optional (T,) score; higher keeps its slot first.
        renormalise: rescale the kept weights of each token to sum to 1 (False: keep them, as
            Top-1 routing's gate probabilities are kept).

    Returns:
        The kept mask, renormalised weights and drop statistics.
    """
    num_tokens, top_k = expert_indices.shape
    device = expert_indices.device
    token_order = torch.arange(num_tokens, device=device)  # (T,)
    if priority is not None:
        token_order = torch.argsort(priority, descending=True, stable=True)  # (T,)
    # Assignments in fill order, choice-rank major: (K, T) -> (K*T,)
    ordered_experts = expert_indices[token_order].t().reshape(-1)  # (K*T,)
    load = torch.bincount(ordered_experts, minlength=num_experts)  # (E,)
    if capacity is None:
        kept = torch.ones_like(expert_indices, dtype=torch.bool)  # (T, K)
    else:
        by_expert = torch.argsort(ordered_experts, stable=True)  # (K*T,) fill order within each expert
        starts = torch.cumsum(load, 0) - load  # (E,) first sorted position of each expert
        position_sorted = torch.arange(ordered_experts.numel(), device=device) - starts[ordered_experts[by_expert]]
        position = torch.empty_like(position_sorted)
        position[by_expert] = position_sorted  # (K*T,) slot index of each assignment in fill order
        kept_ordered = (position < capacity).reshape(top_k, num_tokens).t()  # (T, K) in token_order rows
        kept = torch.empty_like(kept_ordered)
        kept[token_order] = kept_ordered  # (T, K) back to batch order
    kept_weights = weights * kept  # (T, K)
    total = kept_weights.sum(dim=-1, keepdim=True)  # (T, 1)
    renormalised = kept_weights
    if renormalise:
        renormalised = torch.where(total > 0, kept_weights / total.clamp_min(1e-20), torch.zeros_like(kept_weights))
    kept_count = torch.bincount(expert_indices[kept], minlength=num_experts)  # (E,)
    return SlotAssignment(
        kept=kept,
        weights=renormalised,
        dropped_per_expert=load - kept_count,
        load_per_expert=load,
        fully_dropped=~kept.any(dim=-1),
    )


@dataclass
class DispatchPlan:
    """The kept assignments sorted by expert: row i of the send buffer is token ``token_index[i]``."""

    token_index: Tensor  # (A,) token of each kept assignment, grouped by expert
    choice_index: Tensor  # (A,) which of the token's K choices it is
    expert_index: Tensor  # (A,) expert of each kept assignment, non-decreasing
    tokens_per_expert: Tensor  # (E,) int64 rows sent to each expert


def plan_dispatch(expert_indices: Tensor, kept: Tensor, num_experts: int) -> DispatchPlan:
    """Sorts kept (token, choice) pairs by expert id (stable, so batch order within an expert)."""
    token_index, choice_index = torch.nonzero(kept, as_tuple=True)  # (A,), (A,) token-major
    experts = expert_indices[token_index, choice_index]  # (A,)
    order = torch.argsort(experts, stable=True)  # (A,)
    return DispatchPlan(
        token_index=token_index[order],
        choice_index=choice_index[order],
        expert_index=experts[order],
        tokens_per_expert=torch.bincount(experts, minlength=num_experts),
    )


# ---------------------------------------------------------------------------------------------
# Payload packing: a dict of (T, ...) tensors <-> one (T, F) buffer per dtype


@dataclass(frozen=True)
class PayloadEntry:
    name: str
    shape: tuple[int, ...]  # per-token shape
    dtype: torch.dtype
    offset: int  # column offset in its dtype's buffer
    width: int  # number of columns


@dataclass(frozen=True)
class PayloadSpec:
    """How a payload dict maps onto flat buffers, one per dtype (ints never ride in a float buffer)."""

    entries: tuple[PayloadEntry, ...]
    widths: tuple[tuple[torch.dtype, int], ...]  # buffer dtype -> total columns, in a fixed order

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(dtype for dtype, _ in self.widths)


def payload_spec(payload: dict[str, Tensor]) -> PayloadSpec:
    """Describes a payload dict; every rank builds the same spec from the same keys and shapes."""
    offsets: dict[torch.dtype, int] = {}
    entries = []
    for name in sorted(payload):
        tensor = payload[name]
        shape = tuple(tensor.shape[1:])
        width = math.prod(shape)
        offset = offsets.get(tensor.dtype, 0)
        entries.append(PayloadEntry(name, shape, tensor.dtype, offset, width))
        offsets[tensor.dtype] = offset + width
    widths = tuple(sorted(offsets.items(), key=lambda item: str(item[0])))
    return PayloadSpec(entries=tuple(entries), widths=widths)


def pack_rows(payload: dict[str, Tensor], spec: PayloadSpec, rows: Tensor) -> list[Tensor]:
    """Gathers ``rows`` of every payload tensor into one (A, F_dtype) buffer per dtype.

    Columns are packed per token first and gathered once: ``rows`` usually repeats each token K
    times, and ``index_select``'s backward (``index_add``) is far cheaper than advanced indexing's
    (an accumulating ``index_put``).
    """
    buffers = []
    for dtype, _ in spec.widths:
        columns = [payload[e.name].reshape(payload[e.name].shape[0], e.width)  # (T, F_e)
                   for e in spec.entries if e.dtype == dtype]
        per_token = columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)  # (T, F_dtype)
        buffers.append(per_token.index_select(0, rows))  # (A, F_dtype)
    return buffers


def unpack_rows(buffers: list[Tensor], spec: PayloadSpec) -> dict[str, Tensor]:
    """Inverse of ``pack_rows``: per-dtype (n, F) buffers -> dict of (n, *shape) tensors (views)."""
    by_dtype = dict(zip(spec.dtypes, buffers))
    payload = {}
    for e in spec.entries:
        buffer = by_dtype[e.dtype]
        # An entry that fills its buffer is the buffer itself: a column slice's backward would
        # zero-fill a buffer-sized gradient and copy into it.
        columns = buffer if e.width == buffer.shape[1] else buffer[:, e.offset:e.offset + e.width]  # (n, F_e)
        payload[e.name] = columns.reshape(buffer.shape[0], *e.shape)  # (n, *shape)
    return payload


class _WeightedIndexAdd(torch.autograd.Function):
    """``out[t] = sum_a w[a] * rows[a]`` over the kept assignments a of token t.

    Autograd's own multiply + ``index_add`` would allocate two more (A, F) tensors in backward
    (the scaled gradient and the product summed for the weight gradient); here the gathered
    output gradient is scaled in place and the weight gradient is a row-wise dot product.
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, row_weights: Tensor, token_index: Tensor, num_tokens: int) -> Tensor:
        width = math.prod(rows.shape[1:])  # F
        out = rows.new_zeros((num_tokens, *rows.shape[1:]))  # (T, *out)
        weighted = rows.reshape(rows.shape[0], width) * row_weights[:, None]  # (A, F)
        out.view(num_tokens, width).index_add_(0, token_index, weighted)
        ctx.save_for_backward(rows, row_weights, token_index)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None, None]:
        rows, row_weights, token_index = ctx.saved_tensors
        num_rows, width = rows.shape[0], math.prod(rows.shape[1:])  # A, F
        grad_rows = grad_out.reshape(grad_out.shape[0], width).index_select(0, token_index)  # (A, F)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            flat_rows = rows.reshape(num_rows, width, 1)  # (A, F, 1)
            grad_weights = torch.bmm(grad_rows.unsqueeze(1), flat_rows).reshape(num_rows)  # (A,)
        grad_rows.mul_(row_weights[:, None])  # (A, F) now d out / d rows
        return grad_rows.reshape(rows.shape), grad_weights, None, None


def combine(expert_rows: Tensor, plan: DispatchPlan, weights: Tensor, num_tokens: int) -> Tensor:
    """Weighted sum of expert outputs per token: ``out[t] = sum_k w[t, k] * y[t, k]``.

    Args:
        expert_rows: (A, *out_shape) outputs in plan order.
        plan: the dispatch plan.
        weights: (T, K) renormalised combine weights.
        num_tokens: T.

    Returns:
        (T, *out_shape); rows of tokens with no kept assignment are zero.
    """
    row_weights = weights[plan.token_index, plan.choice_index].to(expert_rows.dtype)  # (A,)
    return _WeightedIndexAdd.apply(expert_rows, row_weights, plan.token_index, num_tokens)


def per_choice_outputs(expert_rows: Tensor, plan: DispatchPlan, num_tokens: int, top_k: int) -> Tensor:
    """Scatters expert outputs to (T, K, *out_shape); dropped choices are zero."""
    out = expert_rows.new_zeros((num_tokens, top_k, *expert_rows.shape[1:]))  # (T, K, *out)
    return out.index_put((plan.token_index, plan.choice_index), expert_rows)
