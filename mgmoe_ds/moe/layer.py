"""The routed layer: a router, capacity-limited index dispatch, heterogeneous experts, and combine.

Each token (here: one image) carries a payload dict of tensors of any shape; each expert returns
an output of the layer's declared ``output_shape`` (e.g. class logits), which need not equal the
payload's width. Experts may be different modules with different parameter shapes. With expert
parallelism of size P, this rank builds and holds only experts ``[r*L, (r+1)*L)``, L = E/P, and
payloads travel to them through an ``ExpertParallelComm`` bound after construction; with no comm
bound the layer runs in one process with identical math.

This module imports no ``torch.distributed`` and no DeepSpeed: ``deepspeed_compat`` adapts it to
DeepSpeed's MoE contract, and ``parallel`` owns the collectives.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from mgmoe_ds.moe.dispatch import (
    DispatchPlan,
    assign_slots,
    combine,
    expert_capacity,
    pack_rows,
    payload_spec,
    per_choice_outputs,
    plan_dispatch,
    unpack_rows,
)
from mgmoe_ds.moe.comm import ExpertComm, LocalComm
from mgmoe_ds.moe.losses import load_balancing_loss, router_z_loss
from mgmoe_ds.moe.router import TopKRouter
from mgmoe_ds.moe.routing import RoutingRequest

TARGETS_KEY = "__targets__"  # targets travel with the payload so experts' own losses see labels


def variable_batch_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """Kernel choices for expert calls, whose row counts change every step.

    cuDNN's fused attention builds (and caches) an execution plan per input shape; with routed
    batch sizes that is a new plan almost every step (about 20 ms of host time each on an H100,
    which made Top-2 training 2.5x slower than dense). Flash/efficient attention need no plan.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass
class RouteOutput:
    """What the router decided for this rank's tokens, after capacity."""

    logits: Tensor  # (T, E) fp32 router logits (-inf for experts not allowed)
    probs: Tensor  # (T, E) fp32 router probabilities
    expert_indices: Tensor  # (T, K) chosen experts, best first
    weights: Tensor  # (T, K) combine weights, renormalised over the kept choices
    kept: Tensor  # (T, K) bool: the choice got a capacity slot
    capacity: int  # slots per expert for this step (this rank's largest load when unlimited)
    load_per_expert: Tensor  # (E,) assignments requested
    dropped_per_expert: Tensor  # (E,) assignments dropped for capacity
    fully_dropped: Tensor  # (T,) bool: tokens that lost every choice and got the fallback
    gate_logits: Optional[Tensor] = None  # (T, E) fp32 router logits before any mask (what it would choose)


@dataclass
class MoEOutput:
    """Result of one routed forward; losses are returned here, never stored on the module."""

    output: Tensor  # (T, *output_shape) fused output (weighted sum over kept experts, or fallback)
    route: RouteOutput
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # raw losses by name (weighted by the model's caller)
    expert_rows: Optional[Tensor] = field(default=None, repr=False)  # (A, *output_shape) in plan order
    plan: Optional[DispatchPlan] = field(default=None, repr=False)
    # The zero-valued leaf that ties the exchanged buffers into the graph (expert parallelism in
    # training; None otherwise). A backward restricted to some inputs (``autograd.grad``) must list
    # it among them, or a rank whose exchanges lead to no requested tensor skips their collectives.
    exchange_anchor: Optional[Tensor] = field(default=None, repr=False)

    @property
    def expert_outputs(self) -> Tensor:
        """(T, K, *output_shape) each choice's expert output; zero where dropped (built on demand)."""
        num_tokens, top_k = self.route.expert_indices.shape
        return per_choice_outputs(self.expert_rows, self.plan, num_tokens, top_k)


class RoutedExperts(nn.Module):
    """Top-K routing of per-token payloads to heterogeneous experts with capacity limits.

    Args:
        expert_factories: one zero-argument callable per global expert; only this rank's are
            called. Each built expert maps ``(payload: dict[str, Tensor], targets, segments=...)``
            to an object with ``logits`` (n, *output_shape) and ``aux_losses`` (dict of scalars);
            ``segments`` lists its rows per source rank, and its own losses are sums of
            per-segment losses (see ``experts.base``).
        router_dim: width of the router input.
        output_shape: per-token shape of every expert's output, e.g. ``(num_classes,)``.
        top_k: default K.
        capacity_factor: training capacity factor.
        eval_capacity_factor: evaluation capacity factor.
        min_capacity: lower bound on slots per expert.
        dropless: no capacity limit (every choice is kept).
        noisy_gate_policy: None, "jitter" or "rsample" (training only).
        jitter_eps: jitter range.
        batch_prioritized_routing: fill slots by descending router confidence.
        fallback_head: module mapping router input (n, router_dim) -> (n, *output_shape) for
            tokens that lose every choice to capacity; required unless ``dropless`` or
            ``zero_dropped``.
        zero_dropped: a token that loses every choice gets a zero output (a layer inside a
            residual block: the block's skip connection carries the token on).
        expert_parallel_size: P; must divide the number of experts.
        expert_parallel_rank: this rank's index in its expert-parallel group.
    """

    def __init__(
        self,
        expert_factories: Sequence[Callable[[], nn.Module]],
        *,
        router_dim: int,
        output_shape: Sequence[int],
        top_k: int = 2,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 4,
        dropless: bool = False,
        noisy_gate_policy: Optional[str] = None,
        jitter_eps: float = 0.01,
        batch_prioritized_routing: bool = False,
        fallback_head: Optional[nn.Module] = None,
        zero_dropped: bool = False,
        expert_parallel_size: int = 1,
        expert_parallel_rank: int = 0,
    ) -> None:
        super().__init__()
        num_experts = len(expert_factories)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k = {top_k}: expected 1..{num_experts} (the number of experts)")
        if expert_parallel_size < 1 or num_experts % expert_parallel_size:
            raise ValueError(f"expert_parallel_size = {expert_parallel_size}: expected a positive divisor "
                             f"of the number of experts ({num_experts})")
        if not 0 <= expert_parallel_rank < expert_parallel_size:
            raise ValueError(f"expert_parallel_rank = {expert_parallel_rank}: expected 0..{expert_parallel_size - 1}")
        if capacity_factor <= 0 or eval_capacity_factor <= 0:
            raise ValueError(f"capacity factors must be > 0, got {capacity_factor} and {eval_capacity_factor}")
        if min_capacity < 1:
            raise ValueError(f"min_capacity = {min_capacity}: expected an integer >= 1")
        if fallback_head is None and not (dropless or zero_dropped):
            raise ValueError("a fallback_head is required unless dropless=True or zero_dropped=True: a token that "
                             "loses every expert to capacity must still get an output")
        self.num_experts = num_experts
        self.ep_size = expert_parallel_size
        self.ep_rank = expert_parallel_rank
        self.num_local_experts = num_experts // expert_parallel_size
        self.output_shape = tuple(output_shape)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.dropless = dropless
        self.batch_prioritized_routing = batch_prioritized_routing
        self.router = TopKRouter(router_dim, num_experts, noisy_gate_policy, jitter_eps)
        self.fallback_head = fallback_head
        self.zero_dropped = zero_dropped
        first = self.ep_rank * self.num_local_experts
        local = self._build_local_experts(expert_factories[first:first + self.num_local_experts])
        # Local experts live at ``deepspeed_moe.experts.deepspeed_experts.<local id>``: DeepSpeed's
        # checkpointing finds expert tensors by this path and renames local ids to global ones.
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = local
        self.comm: ExpertComm = LocalComm()

    def _build_local_experts(self, factories: Sequence[Callable[[], nn.Module]]) -> nn.Module:
        """This rank's experts from their factories (a subclass may hold them differently)."""
        return nn.ModuleList(factory() for factory in factories)

    # -- placement ----------------------------------------------------------------------------

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def global_expert_ids(self) -> range:
        """Global ids of the experts this rank holds."""
        first = self.ep_rank * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def bind_comm(self, comm: ExpertComm) -> None:
        """Binds the expert-parallel group (late, as DeepSpeed does); its size must equal P."""
        if comm.size != self.ep_size or comm.rank != self.ep_rank:
            raise ValueError(f"expert-parallel group of size {comm.size}, rank {comm.rank} does not match "
                             f"the layer's placement (P = {self.ep_size}, rank {self.ep_rank})")
        self.comm = comm

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters of the local experts (reduced over the expert-data-parallel group)."""
        return list(self.local_experts.parameters())

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        router_input: Tensor,
        payload: dict[str, Tensor],
        targets: Optional[Tensor] = None,
        routing: Optional[RoutingRequest] = None,
    ) -> MoEOutput:
        """Routes each token's payload to its experts and combines their outputs.

        Args:
            router_input: (T, router_dim) per-token router input.
            payload: dict of (T, ...) tensors sent to the chosen experts.
            targets: optional (T,) labels, sent along so experts can compute their own losses.
            routing: how to route (``moe.routing``); default Top-K with the configured K.
                "dense" and "single" have no capacity limit.

        Returns:
            The fused output, per-choice outputs, the routing decision and the raw losses.
        """
        num_tokens = router_input.shape[0]
        device = router_input.device
        for name, tensor in payload.items():
            if tensor.shape[0] != num_tokens:
                raise ValueError(f"payload[{name!r}] has {tensor.shape[0]} rows, router_input has {num_tokens}")
        request = (routing or RoutingRequest()).resolve(router_input, self.num_experts)
        allowed_experts = request.allowed_experts
        if allowed_experts is None or not allowed_experts.numel():
            allowed_count = self.num_experts
        else:
            allowed_count = int(allowed_experts.sum(-1).min())
        k = (request.top_k or self.top_k) if request.mode == "topk" else allowed_count
        k = min(k, request.max_top_k or k)

        logits = self.router(router_input)  # (T, E) fp32
        selection = self.router.select(logits, k, allowed_experts)
        weights = selection.weights  # (T, K)
        if request.uniform_weights:
            weights = torch.full_like(weights, 1.0 / k)

        limited = request.mode == "topk" and not (self.dropless or request.dropless)
        capacity: Optional[int] = None
        if limited:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            group_tokens = self.comm.max_int(num_tokens, device)
            capacity = expert_capacity(group_tokens, self.num_experts, k, factor, self.min_capacity)
        priority = selection.probs.max(dim=-1).values if self.batch_prioritized_routing else None
        slots = assign_slots(selection.expert_indices, weights, self.num_experts, capacity, priority,
                             renormalise=k > 1)
        plan = plan_dispatch(selection.expert_indices, slots.kept, self.num_experts)

        sent = dict(payload)
        if targets is not None:
            sent[TARGETS_KEY] = targets
        spec = payload_spec(sent)
        buffers = pack_rows(sent, spec, plan.token_index)  # per dtype: (A, F)
        anchor = None
        if torch.is_grad_enabled() and self.comm.size > 1:
            # Every rank must run the same collectives in backward. A rank whose payload or
            # expert outputs happen not to require grad (frozen backbone, no rows for its
            # experts, an empty batch) would skip the backward all-to-all and hang the others,
            # so a zero-valued leaf ties every exchanged float buffer into the graph.
            anchor = torch.zeros((), device=device, requires_grad=True)
            buffers = [b + anchor.to(b.dtype) if b.is_floating_point() else b for b in buffers]

        # Exchange: rows go to the rank that holds their expert, grouped by destination rank.
        recv_counts = self.comm.exchange_counts(plan.tokens_per_expert)  # (P, L)
        send_splits = plan.tokens_per_expert.reshape(self.ep_size, self.num_local_experts).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = [self.comm.exchange(b, recv_splits, send_splits) for b in buffers]  # (R, F) each

        expert_rows, expert_losses, idle_tie = self._run_local_experts(received, recv_counts, spec, router_input.dtype)
        returned = self.comm.exchange(expert_rows, send_splits, recv_splits)  # (A, *out) in plan order

        dropped_tokens = torch.nonzero(slots.fully_dropped, as_tuple=True)[0]  # (D,)
        combine_weights = slots.weights  # (T, K)
        if idle_tie is not None:
            combine_weights = combine_weights + idle_tie
        if dropped_tokens.numel() == 0 and self.fallback_head is not None and self.training:
            # Keep the fallback head in every step's graph so data-parallel reducers see it; a
            # zero term on the (T, K) weights costs nothing next to one on the (T, *out) output.
            unused_head = sum(p.sum() for p in self.fallback_head.parameters())
            combine_weights = combine_weights + 0.0 * unused_head
        fused = combine(returned, plan, combine_weights, num_tokens)  # (T, *out)
        if dropped_tokens.numel() > 0 and not self.zero_dropped:
            if self.fallback_head is None:
                raise RuntimeError("tokens lost every expert to capacity and the layer has no fallback_head")
            fallback = self.fallback_head(router_input[dropped_tokens]).to(fused.dtype)  # (D, *out)
            fused.index_copy_(0, dropped_tokens, fallback)  # in place: fused is combine's fresh buffer

        # Without a limit there is no agreed capacity: report this rank's largest load (no extra
        # collective on the hot path just for a statistic).
        capacity_used = capacity if capacity is not None else (int(slots.load_per_expert.max()) if num_tokens else 0)
        route = RouteOutput(
            logits=selection.logits,
            probs=selection.probs,
            expert_indices=selection.expert_indices,
            weights=slots.weights,
            kept=slots.kept,
            capacity=capacity_used,
            load_per_expert=slots.load_per_expert,
            dropped_per_expert=slots.dropped_per_expert,
            fully_dropped=slots.fully_dropped,
            gate_logits=logits,
        )
        aux_losses = {
            "load_balance": load_balancing_loss(selection.probs, selection.expert_indices[:, 0]),
            "z_loss": router_z_loss(selection.logits),
            **expert_losses,
        }
        return MoEOutput(output=fused, route=route, aux_losses=aux_losses, expert_rows=returned, plan=plan,
                         exchange_anchor=anchor)

    def _run_local_experts(
        self, received: list[Tensor], recv_counts: Tensor, spec: Any, out_dtype: torch.dtype
    ) -> tuple[Tensor, dict[str, Tensor], Optional[Tensor]]:
        """Runs each local expert on its received rows.

        Returns:
            Outputs in received order, the experts' own losses, and a zero-valued scalar that
            ties the experts which received no rows into the graph (None when every expert ran),
            so that every replica's gradient reduction sees the same parameters.
        """
        device = received[0].device if received else recv_counts.device
        grouped, by_expert = self._group_by_local_expert(received, recv_counts)
        per_expert = recv_counts.sum(0).tolist()  # (L,) rows per local expert
        grouped_out, losses, idle_tie = self._apply_local_experts(grouped, per_expert, recv_counts, spec, out_dtype,
                                                                  device)
        tied = [b for b in received if b.requires_grad]
        if self.comm.size > 1 and torch.is_grad_enabled() and tied:
            # Keeps the received buffers in the graph even when no local expert used them, so the
            # payload all-to-all's backward runs on every rank (see the anchor in ``forward``).
            grouped_out = grouped_out + sum(b.sum() for b in tied).to(grouped_out.dtype) * 0.0
        if by_expert is None:
            return grouped_out, losses, idle_tie
        # Back to received order: row by_expert[i] of the received buffer is grouped row i.
        in_received_order = grouped_out.new_empty(grouped_out.shape).index_copy_(0, by_expert, grouped_out)
        return in_received_order, losses, idle_tie

    @staticmethod
    def _group_by_local_expert(received: list[Tensor], recv_counts: Tensor) -> tuple[list[Tensor], Optional[Tensor]]:
        """Received buffers reordered so each local expert's rows are contiguous, and the order
        used (None: rows from a single source are already grouped)."""
        num_sources, num_local = recv_counts.shape
        if num_sources == 1:
            return received, None
        device = received[0].device if received else recv_counts.device
        counts_flat = recv_counts.reshape(-1).to(device)  # (P*L,) in (source, local expert) order
        local_of_row = torch.arange(num_local, device=device).repeat(num_sources)  # (P*L,)
        row_expert = torch.repeat_interleave(local_of_row, counts_flat)  # (R,)
        by_expert = torch.argsort(row_expert, stable=True)  # (R,) rows grouped by local expert
        return [b.index_select(0, by_expert) for b in received], by_expert  # (R, F) each

    def _apply_local_experts(self, grouped: list[Tensor], per_expert: list[int], recv_counts: Tensor, spec: Any,
                             out_dtype: torch.dtype, device: torch.device
                             ) -> tuple[Tensor, dict[str, Tensor], Optional[Tensor]]:
        """The local experts on rows grouped by expert: (R, *out) outputs, their own losses and
        the idle experts' zero tie."""
        # Rows per (source rank, local expert): an expert's own losses are summed over its sources'
        # segments, so they get the gradient data parallelism would give them (experts.base).
        segments_by_expert = recv_counts.t().tolist()  # (L, P)
        # One split per buffer: its backward concatenates the experts' gradients once, where
        # per-expert slices would each zero-fill and add a gradient of the whole buffer.
        expert_slices = [g.split(per_expert) for g in grouped]  # per buffer: L tensors (count, F)
        outputs, losses, idle_tie = [], {}, None
        for local_id, (expert, count) in enumerate(zip(self.local_experts, per_expert)):
            if count == 0:
                idle = sum(p.sum() for p in expert.parameters() if p.requires_grad)
                if isinstance(idle, Tensor):
                    idle_tie = 0.0 * idle if idle_tie is None else idle_tie + 0.0 * idle
                continue
            rows = unpack_rows([slices[local_id] for slices in expert_slices], spec)
            targets = rows.pop(TARGETS_KEY, None)
            with variable_batch_kernels(device):
                result = expert(rows, targets, segments=segments_by_expert[local_id])
            logits = result.logits
            if tuple(logits.shape) != (count, *self.output_shape):
                raise RuntimeError(f"expert {self.global_expert_ids[local_id]} ({type(expert).__name__}) returned "
                                   f"shape {tuple(logits.shape)}, expected {(count, *self.output_shape)}")
            outputs.append(logits.to(out_dtype))
            for name, value in result.aux_losses.items():
                losses[name] = losses[name] + value if name in losses else value
        if outputs:
            return torch.cat(outputs, dim=0), losses, idle_tie  # (R, *out) grouped by local expert
        return torch.zeros((0, *self.output_shape), dtype=out_dtype, device=device), losses, idle_tie


def layer_from_config(
    expert_factories: Sequence[Callable[[], nn.Module]],
    moe_config: Any,
    *,
    router_dim: int,
    output_shape: Sequence[int],
    fallback_head: Optional[nn.Module],
    expert_parallel_rank: int = 0,
) -> RoutedExperts:
    """Builds a RoutedExperts from a ``config.MoEConfig``."""
    return RoutedExperts(
        expert_factories,
        router_dim=router_dim,
        output_shape=output_shape,
        top_k=moe_config.top_k,
        capacity_factor=moe_config.capacity_factor,
        eval_capacity_factor=moe_config.eval_capacity_factor,
        min_capacity=moe_config.min_capacity,
        dropless=moe_config.dropless,
        noisy_gate_policy=moe_config.noisy_gate_policy,
        jitter_eps=moe_config.jitter_eps,
        batch_prioritized_routing=moe_config.batch_prioritized_routing,
        fallback_head=fallback_head,
        expert_parallel_size=moe_config.expert_parallel_size,
        expert_parallel_rank=expert_parallel_rank,
    )
