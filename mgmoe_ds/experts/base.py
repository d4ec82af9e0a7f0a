"""The expert contract the MoE engine relies on, and small helpers shared by the experts.

An expert is a head on the shared backbone's features. The engine gathers, for the n images
routed to an expert on this rank, the backbone features the expert declares in
``required_features`` (each with leading dim n, n >= 1) and calls
``expert(payload, targets, segments)``. The task cross-entropy on the fused logits is the model's
job; an expert returns its logits and only its method's own extra losses, already multiplied by
its own weights.

``segments`` says how many of the n rows came from each source rank (in order; None: one
source). Under expert parallelism an expert's rows come from several ranks, and DeepSpeed
averages its gradient as if every rank had computed the expert's losses on its own rows. So each
own loss is the sum over segments of the loss computed on that segment alone (a per-segment
mean, pairs only within a segment): the gradient is then exactly the data-parallel one at any
expert-parallel size. :func:`segment_mean` and :func:`segment_ratio` do the reductions.

Every expert must train with n == 1 (no BatchNorm over the batch: LayerNorm or GroupNorm
instead), draw random numbers only in ``self.training``, and never touch torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from mgmoe_ds.typed_json import RangeError

Segments = Optional[Sequence[int]]  # rows per source rank, in row order; None: all rows from one rank


@dataclass
class ExpertOutput:
    logits: Tensor  # (n, num_classes)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # weighted scalars by name; empty when targets is None


@dataclass(frozen=True)
class Bound:
    """A range an option must lie in; a tuple's entries are checked one by one, and None always passes."""

    accepted: str  # what is accepted, in words, for the error line
    holds: Callable[[Any], bool]  # True for a value in range

    def check(self, options: ExpertOptions, *names: str) -> None:
        """Raises ``RangeError`` naming the first of the ``names`` options (or tuple entry) out of range."""
        for name in names:
            value = getattr(options, name)
            for index, entry in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
                if entry is not None and not self.holds(entry):
                    raise RangeError(name if index is None else f"{name}[{index}]", entry, self.accepted)


AT_LEAST_ONE = Bound("an integer >= 1", lambda v: v >= 1)  # widths, counts, grids
NON_NEGATIVE = Bound("a number >= 0", lambda v: v >= 0)  # loss weights
RATE = Bound("a number in [0, 1)", lambda v: 0 <= v < 1)  # dropout, part drop, label smoothing, drop path


@dataclass(frozen=True)
class ExpertOptions:
    """Base of an expert's options: a frozen dataclass with one typed, defaulted field per keyword of
    the expert's ``__init__`` (after ``info`` and ``num_classes``).

    ``create_expert`` and the run config build it strictly from plain values
    (``config.options_from_dict``: unknown keys and wrong types are refused there); ``validate``
    holds the range checks and runs on construction.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ``config.RangeError`` naming the first option out of range."""


class Expert(nn.Module):
    """Base class of every expert.

    ``required_features`` is the class default; an expert whose needs depend on the backbone
    (TransFG without CLS attention) overrides it on the instance, so read it from the instance,
    or, before building, from ``features_for(info, **options)``.
    ``options_class`` is the expert's options dataclass: its fields are every keyword
    ``create_expert`` accepts, with their defaults.
    """

    required_features: ClassVar[frozenset[str]] = frozenset()
    options_class: ClassVar[type[ExpertOptions]] = ExpertOptions
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

    def forward(self, payload: dict[str, Tensor], targets: Optional[Tensor],
                segments: Segments = None) -> ExpertOutput:
        raise NotImplementedError

    def head_parameters(self) -> list[nn.Parameter]:
        """The classification head(s): what stage-2 residual fine-tuning unfreezes."""
        raise NotImplementedError


def stochastic_depth(rate: float) -> nn.Module:
    """Stochastic depth on one branch: timm's ``DropPath(rate)``, which zeroes the branch for a
    random ``rate`` of the images (each kept one scaled by ``1 / (1 - rate)``) in training only;
    an identity at rate 0, so that no random number is drawn."""
    return DropPath(rate) if rate > 0 else nn.Identity()


def map_to_tokens(feature_map: Tensor) -> Tensor:
    """(n, C, H, W) -> (n, H * W, C)."""
    return feature_map.flatten(2).transpose(1, 2)


def zero_loss(like: Tensor) -> Tensor:
    """A scalar zero that stays in ``like``'s graph (so every rank's backward sees the same params)."""
    return like.sum() * 0.0


def segment_ids(segments: Segments, num_rows: int, device: torch.device) -> Tensor:
    """(n,) the segment of each row (all zeros for one segment)."""
    if segments is None:
        return torch.zeros(num_rows, dtype=torch.long, device=device)
    if sum(segments) != num_rows:
        raise ValueError(f"segments {list(segments)} add up to {sum(segments)} rows, not {num_rows}")
    sizes = torch.as_tensor(list(segments), dtype=torch.long, device=device)  # (S,)
    return torch.repeat_interleave(torch.arange(len(segments), device=device), sizes)  # (n,)


def segment_sums(values: Tensor, segments: Segments) -> Tensor:
    """(n,) per-row values -> (S,) their sum over each segment."""
    count = 1 if segments is None else len(segments)
    ids = segment_ids(segments, values.shape[0], values.device)  # (n,)
    return values.new_zeros(count).index_add(0, ids, values)  # (S,)


def segment_mean(values: Tensor, segments: Segments) -> Tensor:
    """Sum over segments of the mean of ``values`` (n,) over the segment's rows; an empty segment adds 0.

    With one segment this is ``values.mean()``.
    """
    sizes = [values.shape[0]] if segments is None else list(segments)
    counts = torch.as_tensor(sizes, dtype=values.dtype, device=values.device)  # (S,)
    return (segment_sums(values, segments) / counts.clamp_min(1)).sum()


def segment_ratio(numerators: Tensor, denominators: Tensor, segments: Segments) -> Tensor:
    """Sum over segments of (sum of ``numerators``) / max(1, sum of ``denominators``) over the segment."""
    return (segment_sums(numerators, segments) / segment_sums(denominators, segments).clamp_min(1)).sum()
