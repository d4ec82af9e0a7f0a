"""The router: fp32 logits from a per-token router input, and Top-K selection with renormalised weights.

Gate math is fp32 whatever the model's dtype (as in DeepSpeed and Tutel): small logit differences
decide routing, and bf16 rounds them away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RouterSelection:
    """The router's decision for a batch of tokens, before capacity is applied."""

    logits: Tensor  # (T, E) fp32, -inf where an expert is not allowed
    probs: Tensor  # (T, E) fp32 softmax over allowed experts
    expert_indices: Tensor  # (T, K) chosen experts, best first
    weights: Tensor  # (T, K) fp32 probs of the chosen experts, renormalised to sum to 1


class TopKRouter(nn.Module):
    """A linear gate in fp32 with optional training-only noise.

    Args:
        input_dim: width of the router input (e.g. pooled backbone features).
        num_experts: E.
        noisy_gate_policy: None; "jitter" multiplies the input by U(1 - eps, 1 + eps);
            "rsample" adds Gumbel noise to the logits used for selection only (weights stay clean).
        jitter_eps: the jitter range.
    """

    def __init__(self, input_dim: int, num_experts: int, noisy_gate_policy: Optional[str] = None,
                 jitter_eps: float = 0.01) -> None:
        super().__init__()
        if noisy_gate_policy not in (None, "jitter", "rsample"):
            raise ValueError(f"noisy_gate_policy = {noisy_gate_policy!r}: expected None, 'jitter' or 'rsample'")
        self.num_experts = num_experts
        self.noisy_gate_policy = noisy_gate_policy
        self.jitter_eps = jitter_eps
        self.gate = nn.Linear(input_dim, num_experts, bias=False, dtype=torch.float32)
        nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, router_input: Tensor) -> Tensor:
        """Returns fp32 logits (T, E) for router_input (T, D)."""
        x = router_input.float()
        if self.training and self.noisy_gate_policy == "jitter" and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x, self.gate.weight.float())  # (T, E)

    def select(self, logits: Tensor, top_k: int, allowed_experts: Optional[Tensor] = None) -> RouterSelection:
        """Top-K selection.

        Args:
            logits: (T, E) fp32 router logits.
            top_k: K, 1 <= K <= number of allowed experts.
            allowed_experts: optional bool mask, (E,) for every token or (T, E) per token;
                disallowed experts are never chosen and the softmax is renormalised over the
                allowed ones.

        Returns:
            The selection, with weights renormalised over the chosen K; at K = 1 the weight is
            the gate probability itself (Switch), so the task loss trains the router.
        """
        if allowed_experts is not None:
            allowed_count = int(allowed_experts.sum(-1).min()) if allowed_experts.numel() else 0
            if logits.shape[0] and not 1 <= top_k <= allowed_count:
                raise ValueError(f"top_k = {top_k}: expected 1..{allowed_count} (the number of allowed experts)")
            logits = logits.masked_fill(~allowed_experts.to(logits.device), float("-inf"))  # (T, E)
        probs = torch.softmax(logits, dim=-1)  # (T, E)
        choice_logits = logits
        if self.training and self.noisy_gate_policy == "rsample":
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-9)).clamp_min(1e-9))
            choice_logits = logits + gumbel  # (T, E); -inf stays -inf
        expert_indices = torch.topk(choice_logits, top_k, dim=-1).indices  # (T, K)
        chosen = probs.gather(1, expert_indices)  # (T, K)
        if top_k == 1:
            # Switch's choice: the expert's output scaled by its gate probability. Renormalised over
            # one choice the weight would be 1 and the task loss would never reach the router.
            weights = chosen  # (T, 1)
        else:
            weights = chosen / chosen.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # (T, K)
        return RouterSelection(logits=logits, probs=probs, expert_indices=expert_indices, weights=weights)
