"""The expert contract the MoE engine relies on, and small helpers shared by the experts.

An expert is a head on the shared backbone's features. The engine gathers, for the n images
routed to an expert on this rank, the backbone features the expert declares in
``required_features`` (each with leading dim n, n >= 1) and calls ``expert(payload, targets)``.
The task cross-entropy on the fused logits is the model's job; an expert returns its logits and
only its method's own extra losses, already multiplied by its own weights.

Every expert must train with n == 1 (no BatchNorm over the batch: LayerNorm or GroupNorm
instead), draw random numbers only in ``self.training``, and never touch torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from torch import Tensor, nn


@dataclass
class ExpertOutput:
    logits: Tensor  # (n, num_classes)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # weighted scalars by name; empty when targets is None


class Expert(nn.Module):
    """Base class of every expert.

    ``required_features`` is the class default; an expert whose needs depend on the backbone
    (TransFG without CLS attention) overrides it on the instance, so read it from the instance,
    or, before building, from ``features_for(info, **options)``.
    ``default_options`` lists every keyword ``create_expert`` accepts, with its default.
    """

    required_features: ClassVar[frozenset[str]] = frozenset()
    default_options: ClassVar[dict[str, Any]] = {}
    # Training from a feature cache (frozen backbone): an expert that needs the raw image in
    # training sets needs_raw_images, and its stages then run uncached; one that trains on a
    # cached substitute of an image-space step says which in cached_training_note (logged).
    needs_raw_images: ClassVar[bool] = False
    cached_training_note: ClassVar[Optional[str]] = None

    @classmethod
    def features_for(cls, info, **options: Any) -> frozenset[str]:
        """The backbone features this expert reads on ``info``'s backbone, without building it.

        Lets a rank request the features of experts held by other ranks (expert parallelism).
        """
        return cls.required_features

    def forward(self, payload: dict[str, Tensor], targets: Optional[Tensor]) -> ExpertOutput:
        raise NotImplementedError

    def head_parameters(self) -> list[nn.Parameter]:
        """The classification head(s): what stage-2 residual fine-tuning unfreezes."""
        raise NotImplementedError


def map_to_tokens(feature_map: Tensor) -> Tensor:
    """(n, C, H, W) -> (n, H * W, C)."""
    return feature_map.flatten(2).transpose(1, 2)


def zero_loss(like: Tensor) -> Tensor:
    """A scalar zero that stays in ``like``'s graph (so every rank's backward sees the same params)."""
    return like.sum() * 0.0
