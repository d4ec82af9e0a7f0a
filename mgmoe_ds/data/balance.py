"""Class re-balancing for long-tailed data: repeat factors and their systematic rounding.

A repeat factor ``f_c`` is how many copies of each sample of class ``c`` an epoch should hold on
average. Rounding it with an independent coin flip per sample gets the average right but makes
the length of every pass a random number that nobody knows before the pass ends. Each worker
instead rounds systematically, per class: with ``m`` samples of class ``c`` seen so far in its
pass and an offset ``u_c`` in [0, 1) drawn per (epoch, rank, worker, class), the next sample of
``c`` gets ``floor((m + 1) * f_c + u_c) - floor(m * f_c + u_c)`` copies. The copies of a class
then add up to ``floor(m_c * f_c + u_c)`` for ``m_c`` samples, in whatever order they come, so
the length of a pass follows from the per-shard class counts of the manifest (``len(loader)``
is exact), and the number of copies of a class is within one of ``m_c * f_c`` instead of
spreading with ``sqrt(m_c)``. Over epochs (a new ``u_c`` each) every sample still gets ``f_c``
copies on average.
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import numpy as np

from .formats import DataError

BALANCE_MODES = ("class", "sqrt")


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from the string form of ``parts``, the same in every process and run."""
    return random.Random(":".join(str(p) for p in parts)).getrandbits(63)


def repeat_factors(class_counts: list[int], balance: Optional[str]) -> Optional[np.ndarray]:
    """Expected copies per sample of each class so that an epoch keeps its length but the
    class distribution becomes uniform (``"class"``) or proportional to sqrt(count) (``"sqrt"``)."""
    if balance is None:
        return None
    if balance not in BALANCE_MODES:
        raise DataError(f"balance = {balance!r}: expected one of {BALANCE_MODES} or None")
    counts = np.asarray(class_counts, dtype=np.float64)
    present = counts > 0
    weights = np.where(present, 1.0, 0.0) if balance == "class" else np.sqrt(counts)
    target = counts.sum() * weights / weights.sum()  # samples per class per epoch
    return np.where(present, target / np.maximum(counts, 1.0), 0.0)


def balance_offsets(epoch_seed: int, epoch: int, rank: int, worker: int, num_classes: int) -> np.ndarray:
    """The offsets ``u_c`` in [0, 1) of one worker's pass, one per class, shape ``(num_classes,)``.

    The worker draws them when its pass starts and ``len(loader)`` draws them again to count the
    pass in advance; both must call this function so that they agree.
    """
    rng = np.random.default_rng(stable_seed(epoch_seed, epoch, rank, worker, "balance"))
    return rng.random(num_classes)  # (C,)


def systematic_total(count: int, factor: float, offset: float) -> int:
    """Copies of the first ``count`` samples of a class: ``floor(count * factor + offset)``.

    The per-sample copies are differences of this one expression, so their sum telescopes to it
    exactly, in floating point too.
    """
    return math.floor(count * factor + offset)


def systematic_copies(index: int, factor: float, offset: float) -> int:
    """Copies of the ``index``-th sample (0-based) of a class in one pass."""
    return systematic_total(index + 1, factor, offset) - systematic_total(index, factor, offset)


def pass_length(class_counts: np.ndarray, factors: np.ndarray, offsets: np.ndarray) -> int:
    """Samples a pass yields from ``class_counts[c]`` samples of each class, all shapes ``(C,)``."""
    return sum(systematic_total(int(m), float(f), float(u))
               for m, f, u in zip(class_counts, factors, offsets) if m > 0)
