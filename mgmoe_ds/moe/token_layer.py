"""Token-level sparse MoE inside the backbone: many homogeneous experts, soft and hard constraints.

``TokenMoE`` replaces a per-token sublayer of a backbone block (a ViT block's MLP, a CNN block's
1x1 projection): each token (a spatial position or a patch) — or, at ``image`` granularity, each
image with all its tokens — is routed to its Top-K of E experts under a capacity limit, through
the same engine as the head layer (``RoutedExperts``: router, capacity, index dispatch, the
expert-parallel exchange, DeepSpeed's contract). The experts are ``BatchedExperts``.

Two constraints keep training stable:

* soft: auxiliary losses on the gate, ``importance`` (the squared coefficient of variation of
  each expert's summed gate probability, V-MoE) and ``load`` (GShard's balancing loss);
* hard: an expert whose running share of the gate exceeds ``threshold`` is masked out of the
  gate, so its weight for every token is zero; at most E - K experts are masked at once (the most
  used first), so every token keeps K experts. The share is an exponential moving average of the
  expert's mean top-K gate weight (the sparse gate: each token's K weights renormalised to sum to
  1, zero elsewhere; its share of the routing), averaged over the expert-parallel group. The dense
  softmax would not do: a router whose probabilities stay nearly flat can still send almost every
  token to the same expert, whose mean probability then never nears a threshold. The share is
  measured on the gate before the mask (what the router would choose), so an expert stays masked
  while the router still prefers it, instead of being unmasked as soon as the mask has starved its
  share and masked again a few steps later. Evaluation applies the mask the training ended with
  (``hard_at_eval``, the default): the model is judged under the routing it was trained with, not
  with an expert back that the rest of the network learned to do without.

The block's own forward (timm's) calls this module like the sublayer it replaced, so what the
layer decided and its losses come out through :func:`collect_token_moe`, a context the model
opens around the backbone, never through state kept on the module. No ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgmoe_ds.moe.batched import BatchedExperts, MatmulBackend
from mgmoe_ds.moe.dispatch import unpack_rows
from mgmoe_ds.moe.layer import MoEOutput, RoutedExperts
from mgmoe_ds.moe.routing import RoutingRequest

Granularity = Literal["token", "image"]
Layout = Literal["channels_first", "tokens"]  # (B, C, H, W) maps, or (B, N, C) token sequences
PAYLOAD = "x"


def importance_loss(router_probs: Tensor) -> Tensor:
    """V-MoE's importance loss: ``CV(importance)^2``, importance_e = sum over tokens of p(e).

    0 when every expert gets the same total gate probability; E - 1 when one expert gets it all.

    Args:
        router_probs: (T, E) fp32 gate probabilities.
    """
    if router_probs.shape[0] == 0:
        return router_probs.sum() * 0.0
    importance = router_probs.sum(dim=0)  # (E,)
    return importance.var(unbiased=False) / importance.mean().square().clamp_min(1e-20)


def sparse_gate(logits: Tensor, top_k: int) -> Tensor:
    """(T, E) router logits -> (T, E): each token's top-K softmax probabilities renormalised to sum
    to 1, zero for the other experts (the gate's routing weights, before any capacity limit)."""
    top = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)  # values, indices (T, K)
    weights = top.values / top.values.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # (T, K)
    return torch.zeros_like(logits, dtype=torch.float32).scatter_(1, top.indices, weights)  # (T, E)


def hard_constraint_allowed(share: Tensor, threshold: float, min_allowed: int) -> Tensor:
    """(E,) running gate share -> (E,) bool: the experts the gate may use.

    An expert whose share exceeds ``threshold`` is masked; when that would leave fewer than
    ``min_allowed`` experts, only the most used are masked, so ``min_allowed`` always remain.
    """
    over = share > threshold  # (E,)
    # Rank 0 = the most used. Experts over the threshold are the most used ones, so keeping the
    # mask to ranks below E - min_allowed masks the most used of them (no host sync).
    rank = torch.argsort(torch.argsort(share, descending=True, stable=True))  # (E,)
    return ~(over & (rank < share.numel() - min_allowed))


@dataclass
class TokenMoERecord:
    """One token-level layer's forward: its routing and its raw losses (``importance``, ...)."""

    output: MoEOutput
    losses: dict[str, Tensor]
    tokens_per_image: int  # rows of the route per image: N at token granularity, 1 at image
    allowed_experts: Optional[Tensor] = None  # (E,) the hard constraint's mask in this step


@dataclass
class TokenMoECollector:
    """What the backbone's token-level layers did in one forward, by layer name."""

    routing: dict[str, RoutingRequest] = field(default_factory=dict)  # requests by layer name
    records: dict[str, TokenMoERecord] = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[Optional[TokenMoECollector]] = contextvars.ContextVar("token_moe", default=None)


@contextlib.contextmanager
def collect_token_moe(routing: Optional[dict[str, RoutingRequest]] = None) -> Iterator[TokenMoECollector]:
    """Collects every ``TokenMoE`` forward inside the block; ``routing`` routes layers by name."""
    collector = TokenMoECollector(routing=dict(routing or {}))
    token = _ACTIVE.set(collector)
    try:
        yield collector
    finally:
        _ACTIVE.reset(token)


class BatchedRoutedExperts(RoutedExperts):
    """The routed layer with ``BatchedExperts``: every local expert in one call.

    The payload is ``{"x": (T, *token_shape, in)}``; the output is ``(T, *token_shape, out)``.
    A token that loses every choice to capacity gets zeros (the block's skip connection carries
    it), so there is no fallback head.

    Args:
        num_experts: E.
        widths: the experts' layer widths, e.g. ``(C, H, C)``.
        activation: between layers.
        backend: ``BatchedExperts``'s matmul backend.
        chunk_experts: ``BatchedExperts``'s experts per parameter chunk (None: by its weight budget).
        **options: ``RoutedExperts`` options (router_dim, top_k, capacity, placement, ...).
    """

    def __init__(self, num_experts: int, widths: Sequence[int], *, activation=F.gelu,
                 backend: MatmulBackend = "auto", chunk_experts: Optional[int] = None, **options: Any) -> None:
        self._expert_spec = (tuple(widths), activation, backend, chunk_experts)
        super().__init__(list(range(num_experts)), output_shape=(widths[-1],), zero_dropped=True, **options)

    def _build_local_experts(self, global_ids: Sequence[int]) -> nn.Module:
        widths, activation, backend, chunk_experts = self._expert_spec
        return BatchedExperts(len(global_ids), widths, activation, backend, chunk_experts)

    def _apply_local_experts(self, grouped: list[Tensor], per_expert: list[int], recv_counts: Tensor, spec: Any,
                             out_dtype: torch.dtype, device: torch.device
                             ) -> tuple[Tensor, dict[str, Tensor], Optional[Tensor]]:
        x = unpack_rows(grouped, spec)[PAYLOAD]  # (R, *token_shape, in)
        token_shape = x.shape[1:-1]
        per_row = math.prod(token_shape)  # tokens per routed row: 1, or N at image granularity
        rows = x.reshape(-1, x.shape[-1])  # (R * n, in): n tokens per routed row
        out = self.local_experts(rows, [count * per_row for count in per_expert])  # (R * n, out)
        idle_tie = None
        if x.shape[0] == 0 and torch.is_grad_enabled():
            # No rows: the experts are not in the graph; a zero term keeps every replica's
            # gradient reduction seeing them.
            idle_tie = 0.0 * sum(p.sum() for p in self.local_experts.parameters() if p.requires_grad)
        return out.to(out_dtype).reshape(*x.shape[:-1], out.shape[-1]), {}, idle_tie  # (R, *token_shape, out)


class TokenMoE(nn.Module):
    """A token-level (or image-level) routed layer in place of a backbone block's sublayer.

    Args:
        name: the layer's name in losses, routes and reports (the block's path, "blocks.5.1").
        routed: the ``BatchedRoutedExperts`` (router dim = experts' input width).
        layout: "channels_first" for (B, C, H, W) maps, "tokens" for (B, N, C) sequences.
        granularity: "token" (a gate decision per token) or "image" (one per image, on the mean
            of its tokens; the image's tokens travel together).
        soft: compute the soft constraint's losses (``importance``, ``load``).
        hard_threshold: the hard constraint's share threshold, or None for no hard constraint.
        hard_momentum: the running share's EMA momentum (the weight of the old value).
        hard_at_eval: evaluation masks the experts the running share masks (the share is frozen
            outside training); False routes evaluation with every expert.
    """

    def __init__(self, name: str, routed: BatchedRoutedExperts, *, layout: Layout, granularity: Granularity,
                 soft: bool, hard_threshold: Optional[float], hard_momentum: float = 0.9,
                 hard_at_eval: bool = True) -> None:
        super().__init__()
        if layout not in ("channels_first", "tokens"):
            raise ValueError(f"layout = {layout!r}: expected 'channels_first' or 'tokens'")
        if granularity not in ("token", "image"):
            raise ValueError(f"granularity = {granularity!r}: expected 'token' or 'image'")
        self.name = name
        self.routed = routed
        self.layout = layout
        self.granularity = granularity
        self.soft = soft
        self.hard_threshold = hard_threshold
        self.hard_momentum = hard_momentum
        self.hard_at_eval = hard_at_eval
        # The running share starts uniform, so no expert is masked before it has been measured.
        self.register_buffer("gate_share", torch.full((routed.num_experts,), 1.0 / routed.num_experts))

    def allowed_experts(self) -> Optional[Tensor]:
        """(E,) bool: the experts the hard constraint lets the gate use now (None: no constraint)."""
        if self.hard_threshold is None:
            return None
        return hard_constraint_allowed(self.gate_share, self.hard_threshold, self.routed.top_k)

    def routing_mask(self) -> Optional[Tensor]:
        """(E,) bool: the experts this forward may route to under the hard constraint: its mask in
        training, and in evaluation too with ``hard_at_eval`` (None: every expert)."""
        return self.allowed_experts() if self.training or self.hard_at_eval else None

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "channels_first":
            batch, channels, height, width = x.shape
            tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, N, C)
        else:
            tokens = x  # (B, N, C)
        batch, num_tokens, channels = tokens.shape
        if self.granularity == "token":
            router_input = tokens.reshape(batch * num_tokens, channels)  # (B*N, C)
            payload = router_input
        else:
            router_input = tokens.mean(dim=1)  # (B, C)
            payload = tokens  # (B, N, C): each image's tokens ride together
        collector = _ACTIVE.get()
        request = (collector.routing.get(self.name) if collector is not None else None) or RoutingRequest()
        allowed = self.routing_mask()
        if allowed is not None:
            if request.allowed_experts is not None:
                asked = request.allowed_experts.to(allowed.device)
                both = allowed & asked
                # a request that would leave fewer than K experts with the mask (an evaluation
                # switching one more expert off) is routed as asked (no host sync)
                allowed = torch.where(both.sum(-1, keepdim=True) >= self.routed.top_k, both, asked)
            request = replace(request, allowed_experts=allowed)
        out = self.routed(router_input, {PAYLOAD: payload}, routing=request)
        losses = {"z_loss": out.aux_losses["z_loss"]}
        if self.soft:
            losses["importance"] = importance_loss(out.route.probs)
            losses["load"] = out.aux_losses["load_balance"]
        if self.training and self.hard_threshold is not None:
            # this step's gate before the mask (and before any rsample noise): what the router prefers
            self._update_share(sparse_gate(out.route.gate_logits.detach(), self.routed.top_k))
        if collector is not None:
            collector.records[self.name] = TokenMoERecord(out, losses, num_tokens if self.granularity == "token"
                                                          else 1, allowed)
        y = out.output.reshape(batch, num_tokens, -1)  # (B, N, C_out)
        if self.layout == "channels_first":
            y = y.reshape(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, C_out, H, W)
        return y

    @torch.no_grad()
    def _update_share(self, gate: Tensor) -> None:
        """EMA of each expert's mean gate weight, (T, E) ``gate``, over the expert-parallel group's tokens."""
        totals = torch.cat([gate.sum(dim=0), gate.new_tensor([gate.shape[0]])])  # (E + 1,)
        totals = self.routed.comm.sum(totals)
        mean = (totals[:-1] / totals[-1].clamp_min(1)).to(self.gate_share.dtype)  # (E,)
        updated = self.hard_momentum * self.gate_share + (1 - self.hard_momentum) * mean  # (E,)
        self.gate_share.copy_(torch.where(totals[-1] > 0, updated, self.gate_share))  # no tokens anywhere: unchanged


def token_moe_layers(model: nn.Module) -> dict[str, TokenMoE]:
    """Every ``TokenMoE`` in ``model`` by its layer name."""
    return {m.name: m for m in model.modules() if isinstance(m, TokenMoE)}

