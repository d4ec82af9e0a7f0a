"""Teacher distillation: the distilled target, its cosine term, and a teacher's stored predictions.

The training target of an image with label ``y`` is

    target = weight * smooth(onehot(y)) + (1 - weight) * softmax(teacher_logits / temperature)

with ``smooth(t) = (1 - smoothing) * t + smoothing / C``. The model's cross-entropies take it as
class probabilities (soft cross-entropy), and ``cosine_loss`` adds ``1 - cos(target, p)`` with
``p`` the model's predicted distribution. A Mixup/CutMix batch mixes the labels first
(``train.mixing``); its teacher part is mixed with the same ``lam`` and pairing (image i with
image B-1-i), an approximation of the teacher's prediction on the mixed image.

The teacher's logits on one rank's training samples are computed once per sample and view
(:class:`TeacherPredictions`), stored in memory and in ``ROOT/teacher-<key>/`` (``logits.npy``,
``keys.json``, then ``index.json`` last: a folder without it is an unfinished build), keyed by
:func:`predictions_key`. Rows are looked up by sample key, so any loader order finds them.

Only torch and NumPy; no ``torch.distributed``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

INDEX_FILE = "index.json"


class TeacherError(RuntimeError):
    """The teacher or its stored predictions cannot be used; the message names the file or sample."""


# ---------------------------------------------------------------------------------------------
# The target and the cosine term


def smoothed(targets: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B, C) float32 ``(1 - smoothing) * t + smoothing / C`` of ``targets``: (B,) class indices
    (``t`` their one-hot) or (B, C) class probabilities (Mixup's)."""
    probs = F.one_hot(targets.long(), num_classes).float() if targets.dim() == 1 else targets.float()  # (B, C)
    return probs * (1.0 - smoothing) + smoothing / num_classes


def mixed_like(teacher_probs: Tensor, lam: Optional[float]) -> Tensor:
    """The teacher's part of a Mixup/CutMix batch: ``lam * p + (1 - lam) * p.flip(0)`` (the
    pairing of ``train.mixing``); ``lam`` None (no mixing) returns ``teacher_probs``."""
    if lam is None:
        return teacher_probs
    return teacher_probs * lam + teacher_probs.flip(0) * (1.0 - lam)


def distilled_targets(targets: Tensor, teacher_probs: Tensor, *, weight: float, smoothing: float) -> Tensor:
    """(B, C) float32 ``weight * smoothed(targets) + (1 - weight) * teacher_probs``; rows sum to 1
    when ``teacher_probs``' rows do.

    Args:
        targets: (B,) class indices or (B, C) class probabilities.
        teacher_probs: (B, C) the teacher's predicted distribution of each image.
        weight: the label's share (lambda); 1 - weight is the teacher's.
        smoothing: label smoothing of the label's part.
    """
    label = smoothed(targets.to(teacher_probs.device), teacher_probs.shape[1], smoothing)  # (B, C)
    return label * weight + teacher_probs.float() * (1.0 - weight)


def cosine_loss(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Mean over images of ``1 - cos(targets, softmax(logits))``, in fp32 whatever the autocast;
    zero (in the graph) for an empty batch.

    Args:
        logits: (B, C) the model's fused logits.
        targets: (B, C) target distributions.
        weights: optional (B,) each image's weight: the weighted sum divided by B, as the task
            loss weighs images (``moe.losses.weighted_cross_entropy``).
    """
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.float(), dim=-1)  # (B, C)
        per_image = 1.0 - F.cosine_similarity(probs, targets.float(), dim=-1)  # (B,)
        return per_image.mean() if weights is None else (per_image * weights.to(per_image)).sum() / len(per_image)


# ---------------------------------------------------------------------------------------------
# The stored predictions


def predictions_key(teacher: str, *, transform: str, manifest: bytes, split: str, rank: int, world_size: int,
                    views: int, seed: int) -> str:
    """The sha256 (hex) of what a teacher's stored logits depend on: the teacher (its weights
    digest and routing, :func:`train.distill` builds the string), the transform it saw the
    images through, the dataset's manifests, the split, this rank's share of the shards, the
    number of views and (with several) the seed of their augmentation."""
    digest = hashlib.sha256(teacher.encode())
    meta = {"transform": transform, "split": split, "rank": rank, "world_size": world_size, "views": views,
            "seed": seed if views > 1 else None}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    digest.update(hashlib.sha256(manifest).digest())
    return digest.hexdigest()


@dataclass
class TeacherPredictions:
    """A teacher's logits on this rank's samples: ``logits`` (V, N, C) float32 (a tensor, or a
    read-only memory map), row i being sample ``keys[i]``."""

    key: str
    logits: "Tensor | np.ndarray"
    keys: list[str]
    folder: Optional[Path] = None
    _rows: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rows = {key: row for row, key in enumerate(self.keys)}

    @property
    def num_views(self) -> int:
        return int(self.logits.shape[0])

    def rows(self, keys: Iterable[str]) -> Tensor:
        """(B,) the rows of sample ``keys``; a key the teacher never saw raises naming it."""
        try:
            return torch.tensor([self._rows[key] for key in keys], dtype=torch.long)
        except KeyError as err:
            raise TeacherError(f"teacher predictions {self.key[:12]}: no prediction for sample {err.args[0]!r}; "
                               f"the dataset changed under its manifest") from None

    def probs(self, keys: Iterable[str], views: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
        """(B, C) float32 ``softmax(logits / temperature)`` of samples ``keys``: in view ``views``
        (B,) each (a feature cache's batch knows which view it shows), or the mean over the views
        (a batch of freshly augmented images shows none of them)."""
        rows = self.rows(keys)  # (B,)
        if isinstance(self.logits, Tensor):
            picked = self.logits[:, rows]  # (V, B, C)
        else:
            picked = torch.from_numpy(np.ascontiguousarray(self.logits[:, rows.numpy()]))  # (V, B, C)
        probs = torch.softmax(picked.float() / temperature, dim=-1)  # (V, B, C)
        if views is None:
            return probs.mean(dim=0)  # (B, C)
        return probs[views.long(), torch.arange(rows.shape[0])]  # (B, C)

    def save(self, folder: Path) -> "TeacherPredictions":
        """Writes ``logits.npy`` and ``keys.json``, then ``index.json`` (last: a folder without it
        is an unfinished build) and returns the memory-mapped copy."""
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "logits.npy", np.asarray(self.logits, dtype=np.float32))
        (folder / "keys.json").write_text(json.dumps(self.keys))
        tmp = folder / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "shape": list(self.logits.shape)}))
        os.replace(tmp, folder / INDEX_FILE)
        return load_predictions(folder)


def load_predictions(folder: Path) -> Optional[TeacherPredictions]:
    """The stored predictions in ``folder``, or None when missing or unfinished."""
    if not (folder / INDEX_FILE).is_file():
        return None
    index = json.loads((folder / INDEX_FILE).read_text())
    logits = np.load(folder / "logits.npy", mmap_mode="r")
    keys = json.loads((folder / "keys.json").read_text())
    if list(logits.shape) != index["shape"] or len(keys) != logits.shape[1]:
        return None
    return TeacherPredictions(index["key"], logits, keys, folder)
