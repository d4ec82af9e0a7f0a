"""Mixup and CutMix on one rank's training batch, with soft targets (timm's ``Mixup`` in batch mode).

One ``lam ~ Beta(alpha, alpha)`` per batch; image i is mixed with image B-1-i, the flipped batch
(an odd batch's middle image pairs with itself and stays as it is). With both on, each batch is
CutMix with probability ``SWITCH_PROB``, else Mixup. CutMix pastes a box of area ``(1 - lam)`` of
the image, centred anywhere and clipped at the borders, and ``lam`` becomes the share of pixels
left unchanged. Targets become ``lam * onehot(y) + (1 - lam) * onehot(y_flipped)``, which the
model's cross-entropies take as class probabilities; the model hands its experts each row's
argmax for their own label-dependent losses (TransFG's contrastive pairs need hard labels).

Only ``train.step.TrainStep`` mixes. The validation, clustering and teacher passes
(``train.passes``) read the eval loaders or eval caches and never go through the step, so a
mixed image never enters the cluster teacher's statistics. The draws come from NumPy's global
generator, as timm's do: it is seeded per rank and saved with every checkpoint
(``train.state.Generators``), so a resumed run mixes as the uninterrupted one. No
``torch.distributed`` here: each rank mixes its own micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SWITCH_PROB = 0.5  # with both on: the chance that a batch gets CutMix rather than Mixup


class Mixed(NamedTuple):
    images: Tensor  # (B, 3, H, W) the mixed images (a new tensor; the input is unchanged)
    targets: Tensor  # (B, classes) float32 soft targets; each row sums to 1
    lam: float  # the share of each image's own label (for CutMix: of its pixels left unchanged)
    box: Optional[tuple[int, int, int, int]]  # CutMix's pasted (y0, y1, x0, x1), rows/columns [y0, y1); None: Mixup


def soft_targets(labels: Tensor, num_classes: int, lam: float) -> Tensor:
    """(B, classes) float32: ``lam * onehot(labels) + (1 - lam) * onehot(labels.flip(0))``."""
    onehot = F.one_hot(labels.long(), num_classes).float()  # (B, C)
    return onehot * lam + onehot.flip(0) * (1.0 - lam)


def cutmix_box(height: int, width: int, lam: float, rng: Any = np.random) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox``: a box of sides ``sqrt(1 - lam)`` of the image's, its centre drawn
    uniformly over the image, clipped at the borders: ``(y0, y1, x0, x1)``."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.randint(0, height)), int(rng.randint(0, width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return y0, y1, x0, x1


def mix_batch(images: Tensor, labels: Tensor, num_classes: int, rng: Any = np.random, *,
              mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> Mixed:
    """Mixup or CutMix of ``images`` (B, 3, H, W) with the flipped batch, and its soft targets.

    Args:
        labels: (B,) class indices.
        rng: NumPy's global generator (``np.random``) or a ``np.random.RandomState``.
        mixup_alpha, cutmix_alpha: Beta's alpha of each; 0 turns it off. Both 0: no mixing
            (``lam`` 1, the images returned as they are, one-hot targets).
    """
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random_sample() < SWITCH_PROB)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    if lam == 1.0:
        return Mixed(images, soft_targets(labels, num_classes, 1.0), 1.0, None)
    if not use_cutmix:
        mixed = images * lam + images.flip(0) * (1.0 - lam)  # (B, 3, H, W)
        return Mixed(mixed, soft_targets(labels, num_classes, lam), lam, None)
    height, width = images.shape[-2:]
    y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)  # the clipped box's share, as timm's correct_lam
    return Mixed(mixed, soft_targets(labels, num_classes, lam), lam, (y0, y1, x0, x1))


@dataclass(frozen=True)
class Mixing:
    """This epoch's mixing (``mixing_for_epoch``): ``mixing(images, labels)`` is ``mix_batch``."""

    mixup_alpha: float
    cutmix_alpha: float
    num_classes: int

    def __call__(self, images: Tensor, labels: Tensor, rng: Any = np.random) -> Mixed:
        return mix_batch(images, labels.to(images.device), self.num_classes, rng,
                         mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha)


def epochs_left(stages: list[Any], index: int, epoch: int) -> float:
    """The curriculum's epochs from stage ``index``'s epoch ``epoch`` (0-based) to its end, that
    epoch included; ``inf`` when a stage on the way is measured in steps (config validation makes
    sure none lies within ``data.mix_off_last_epochs``)."""
    left = 0
    for i, stage in enumerate(stages[index:], start=index):
        if stage.epochs is None:
            return math.inf
        left += stage.epochs - (epoch if i == index else 0)
    return left


def mixing_for_epoch(config: Any, index: int, epoch: int, num_classes: int) -> Optional[Mixing]:
    """The mixing of stage ``index``'s epoch ``epoch`` (a ``config.RunConfig``); None: no mixing
    (``data.mixup`` and ``data.cutmix`` both 0, or one of the curriculum's last
    ``data.mix_off_last_epochs`` epochs)."""
    data = config.data
    if data.mixup <= 0 and data.cutmix <= 0:
        return None
    if epochs_left(config.curriculum.stages, index, epoch) <= data.mix_off_last_epochs:
        return None
    return Mixing(data.mixup, data.cutmix, num_classes)


def stage_mixes(config: Any, stage_config: Any) -> bool:
    """Whether any epoch of the stage whose ``curriculum.stages`` entry is ``stage_config`` mixes
    (its first does then: the epochs without mixing come last); an entry not found there counts
    as the first stage's."""
    index = next((i for i, s in enumerate(config.curriculum.stages) if s is stage_config), 0)
    return mixing_for_epoch(config, index, 0, num_classes=2) is not None
