"""The fusion head: a learned, input-dependent weighting of the experts each image ran.

The routed layer fuses an image's experts with the router's weights, fixed once the router is
trained. The fusion head (the ``fusion`` curriculum stage trains it, with everything else frozen)
corrects those weights per image from the pooled features and from what each expert said: whether
it ran, its router weight, its confidence (largest class probability) and its normalised entropy.
An expert the image did not run (not chosen, or its choice dropped for capacity) has the declared
zero: zero logits, zero statistics, and no fusion weight.

The correction ``delta`` is added to the log router weights before a softmax over the experts that
ran, and the result carries the router's total weight (1 when K >= 2; the gate probability at
K = 1, as the layer scales Switch's one expert). The MLP's last layer starts at zero, so an
untrained head computes exactly the layer's own fusion: the stage starts from the model's current
predictions. An image that lost every expert keeps the layer's output (the fallback head's).

Gate math in fp32 whatever the autocast, as the router's. No ``torch.distributed`` here: the
expert outputs are already back on the image's rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgmoe_ds.moe.layer import RouteOutput

STATISTICS = 4  # per expert: ran, router weight, largest class probability, normalised entropy


class FusionHead(nn.Module):
    """Pooled features and the experts' outputs -> fused logits.

    Args:
        pooled_dim: D of the router input (pooled backbone features).
        num_experts: E of the routed layer.
        num_classes: C of each expert's logits.
        hidden: width of the correction MLP.
    """

    def __init__(self, pooled_dim: int, num_experts: int, num_classes: int, *, hidden: int = 64) -> None:
        super().__init__()
        self.num_experts, self.num_classes = num_experts, num_classes
        self.norm = nn.LayerNorm(pooled_dim)
        self.hidden = nn.Linear(pooled_dim + STATISTICS * num_experts, hidden)
        self.correction = nn.Linear(hidden, num_experts)
        nn.init.zeros_(self.correction.weight)  # delta = 0: the router's own fusion at the start
        nn.init.zeros_(self.correction.bias)
        # Set when the fusion stage starts; a checkpoint or an export carries it, so a trained head
        # is used by evaluation and inference and an untrained one never is.
        self.register_buffer("active", torch.zeros((), dtype=torch.bool))

    @property
    def is_active(self) -> bool:
        return bool(self.active)

    def activate(self) -> None:
        self.active.fill_(True)

    def fusion_weights(self, pooled: Tensor, route: RouteOutput, expert_outputs: Tensor) -> tuple[Tensor, Tensor]:
        """Each expert's fusion weight and logits, over all E experts.

        Args:
            pooled: (B, D) the router input.
            route: the layer's routing (``expert_indices``, ``weights``, ``kept``: (B, K)).
            expert_outputs: (B, K, C) each choice's logits (``MoEOutput.expert_outputs``).

        Returns:
            ``(weights, logits)``: (B, E) fp32 weights, zero for an expert the image did not run and
            summing to the router's kept weight otherwise (0 for an image that ran none); (B, E, C)
            fp32 logits, zero for an expert not run.
        """
        batch, top_k = route.expert_indices.shape
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            kept = route.kept  # (B, K) bool
            index = route.expert_indices  # (B, K)
            choices = expert_outputs.float() * kept[:, :, None]  # (B, K, C): a dropped choice is zero
            logits = choices.new_zeros(batch, self.num_experts, self.num_classes).scatter(
                1, index[:, :, None].expand(batch, top_k, self.num_classes), choices)  # (B, E, C)
            ran = torch.zeros(batch, self.num_experts, dtype=torch.bool, device=kept.device).scatter(
                1, index, kept)  # (B, E)
            router_weight = choices.new_zeros(batch, self.num_experts).scatter(
                1, index, route.weights.float() * kept)  # (B, E)
            log_probs = torch.log_softmax(logits, dim=-1)  # (B, E, C)
            probs = log_probs.exp()  # (B, E, C)
            confidence = probs.amax(dim=-1) * ran  # (B, E)
            entropy = -(probs * log_probs).sum(dim=-1) / math.log(self.num_classes) * ran  # (B, E) in [0, 1]
            statistics = torch.stack([ran.float(), router_weight, confidence, entropy], dim=-1)  # (B, E, 4)
            features = torch.cat([F.layer_norm(pooled.float(), self.norm.normalized_shape, self.norm.weight.float(),
                                               self.norm.bias.float(), self.norm.eps),
                                  statistics.flatten(1)], dim=1)  # (B, D + 4E)
            hidden = F.gelu(F.linear(features, self.hidden.weight.float(), self.hidden.bias.float()))  # (B, H)
            delta = F.linear(hidden, self.correction.weight.float(), self.correction.bias.float())  # (B, E)
            scores = router_weight.clamp_min(torch.finfo(torch.float32).tiny).log() + delta  # (B, E)
            # An image that ran no expert softmaxes over all of them (finite, gradients too) and gets 0.
            any_ran = ran.any(dim=-1, keepdim=True)  # (B, 1)
            shares = torch.softmax(scores.masked_fill(~(ran | ~any_ran), float("-inf")), dim=-1) * any_ran  # (B, E)
            mass = router_weight.sum(dim=-1, keepdim=True)  # (B, 1): 1 at K >= 2, the gate probability at K = 1
            return shares * mass, logits

    def forward(self, pooled: Tensor, route: RouteOutput, expert_outputs: Tensor, routed: Tensor) -> Tensor:
        """(B, C) fused logits: ``sum_e weight_e * logits_e``; ``routed`` (B, C), the layer's own
        output, for an image that lost every expert (its fallback) and in the output's dtype."""
        weights, logits = self.fusion_weights(pooled, route, expert_outputs)  # (B, E), (B, E, C)
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            fused = torch.einsum("be,bec->bc", weights, logits)  # (B, C)
        # where, not indexing: the layer's output stays in the graph (its ties of idle experts)
        return torch.where(route.fully_dropped[:, None], routed, fused.to(routed.dtype))  # (B, C)
