"""Router auxiliary losses as pure functions of the router's outputs (no module state)."""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(router_probs: Tensor, top1_indices: Tensor) -> Tensor:
    """GShard load-balancing loss: ``E * sum_e(fraction of tokens whose first choice is e * mean prob of e)``.

    It equals 1 when routing is uniform and grows as load concentrates on few experts.

    Args:
        router_probs: (T, E) softmax probabilities of the router, fp32.
        top1_indices: (T,) each token's first-choice expert.

    Returns:
        A scalar; zero when there are no tokens.
    """
    num_tokens, num_experts = router_probs.shape
    if num_tokens == 0:
        return router_probs.sum() * 0.0
    mean_prob = router_probs.mean(dim=0)  # (E,)
    counts = torch.bincount(top1_indices, minlength=num_experts).to(router_probs.dtype)  # (E,)
    fraction = counts / num_tokens  # (E,)
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(router_logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``; keeps logits small.

    Args:
        router_logits: (T, E) fp32 logits; masked entries may be ``-inf``.

    Returns:
        A scalar; zero when there are no tokens.
    """
    if router_logits.shape[0] == 0:
        return router_logits.sum() * 0.0
    finite = torch.where(torch.isfinite(router_logits), router_logits, torch.full_like(router_logits, -1e9))
    return torch.logsumexp(finite, dim=-1).square().mean()
