"""Losses as pure functions of the router's, the experts' and the model's outputs (no module state)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
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


def weighted_cross_entropy(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Cross-entropy of ``logits`` in fp32: the mean over the images, or with ``weights``
    ``sum_i w_i * CE_i / B``.

    Divided by the number of images B, not by the weights' sum: an image of weight 1 then counts the
    same in every batch whatever else it holds (a batch of weights 1 has the plain mean), and data
    parallelism's averaged gradient is that of the weighted sum over the global batch divided by its
    size. Without ``weights`` this is exactly ``F.cross_entropy(logits.float(), targets)``.

    Args:
        logits: (B, C).
        targets: (B,) class indices or (B, C) class probabilities.
        weights: optional (B,) each image's weight (``data.pseudo_weight`` for a pseudo-label).

    Returns:
        A scalar.
    """
    if weights is None:
        return F.cross_entropy(logits.float(), targets)
    per_image = F.cross_entropy(logits.float(), targets, reduction="none")  # (B,)
    return (per_image * weights.to(per_image)).sum() / max(1, per_image.shape[0])


def expert_cross_entropy(expert_logits: Tensor, expert_indices: Tensor, kept: Tensor, targets: Tensor,
                         num_experts: int, weights: Optional[Tensor] = None) -> Tensor:
    """Each expert's mean cross-entropy on its own logits over the choices it kept (fp32).

    Args:
        expert_logits: (T, K, C) each choice's expert logits.
        expert_indices: (T, K) the chosen experts.
        kept: (T, K) bool, which choices ran.
        targets: (T,) class indices.
        num_experts: E.
        weights: optional (T,) each token's weight: an expert's loss is then the weighted sum over
            its kept choices divided by their number (as :func:`weighted_cross_entropy` divides).

    Returns:
        (E,) means; 0 (in the graph) for an expert with no kept choice here.
    """
    num_tokens, top_k, num_classes = expert_logits.shape
    per_choice = F.cross_entropy(expert_logits.float().reshape(num_tokens * top_k, num_classes),
                                 targets.repeat_interleave(top_k, dim=0), reduction="none")  # (T*K,)
    kept_flat = kept.reshape(-1).float()  # (T*K,)
    experts = expert_indices.reshape(-1)  # (T*K,)
    weighted = per_choice * kept_flat  # (T*K,)
    if weights is not None:
        weighted = weighted * weights.to(per_choice).repeat_interleave(top_k, dim=0)  # (T*K,)
    sums = per_choice.new_zeros(num_experts).index_add(0, experts, weighted)  # (E,)
    counts = kept_flat.new_zeros(num_experts).index_add(0, experts, kept_flat)  # (E,)
    return sums / counts.clamp_min(1)


def diversity_loss(expert_logits: Tensor, kept: Tensor) -> Tensor:
    """Diversity between the experts an image ran: ``-sum_i KL(p_i || p)``, averaged over images.

    Per image, ``p_i`` is the softmax of kept expert i's logits and ``p`` the mean of the kept
    ``p_i``; the value is ``-sum_i KL(p_i || p)`` over the kept experts (a generalised
    Jensen-Shannon divergence, between ``-K log K`` and 0; 0 when they agree). Minimising it pushes
    experts that see the same image, architecture shared or not, to disagree. An expert not kept
    (dropped for capacity, or zero logits standing in for it) does not count, and an image with
    fewer than 2 kept experts adds 0: there is no disagreement to measure.

    The mean runs over all of this rank's B images (not only those with 2 kept experts), as the
    task cross-entropy's does: a weight then means the same thing whatever capacity drops, top-1
    routing gives exactly 0, and data parallelism's averaged gradient is that of the global mean.
    Computed in fp32 whatever the autocast.

    Args:
        expert_logits: (B, K, C) each choice's expert logits (all E experts in a dense stage).
        kept: (B, K) bool, which choices ran.

    Returns:
        A scalar; zero (in the graph) for an empty batch.
    """
    num_images = expert_logits.shape[0]
    if num_images == 0:
        return expert_logits.float().sum() * 0.0
    with torch.autocast(device_type=expert_logits.device.type, enabled=False):
        log_probs = torch.log_softmax(expert_logits.float(), dim=-1)  # (B, K, C)
        counted = kept.sum(dim=1) >= 2  # (B,)
        # An image that adds 0 averages over all its choices: every row has one, so nothing is -inf.
        used = kept | ~counted[:, None]  # (B, K)
        masked = log_probs.masked_fill(~used[:, :, None], float("-inf"))  # (B, K, C)
        count = used.sum(dim=1).to(log_probs.dtype)  # (B,)
        log_mean = torch.logsumexp(masked, dim=1) - count.log()[:, None]  # (B, C): log p
        kl = (log_probs.exp() * (log_probs - log_mean[:, None, :])).sum(dim=-1)  # (B, K): KL(p_i || p)
        per_image = -(kl * kept).sum(dim=1) * counted  # (B,)
        return per_image.sum() / num_images
