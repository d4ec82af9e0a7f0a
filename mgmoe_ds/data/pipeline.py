"""The streaming input pipeline: shards -> decoded, transformed, batched tensors.

One call, :func:`make_loader`, gives the training job an iterable of batches and a
:class:`DataInfo`. Each DataLoader worker runs the pipeline of :mod:`.stream` over its shards;
a bad shard or sample is skipped and counted by default, so after an epoch ``loader.skipped`` is
the total over all workers of this rank.

What the loader guarantees (``resampled=False``, finite epochs):
  * shards are assigned to ranks once, greedily by sample count, so rank ``r`` always reads the
    same shards (``DataInfo.samples_per_rank``); within a rank the shard order is reshuffled each
    epoch (``set_epoch``) and split between workers;
  * every sample of the split is read exactly once per epoch over all ranks and workers;
  * ranks can get different numbers of samples and batches (``len(loader)`` is this rank's
    count for the current epoch; each worker ends with its own partial batch unless
    ``drop_last``). A trainer that needs equal step counts uses ``resampled=True``, or votes per
    batch on which ranks still have one (``train.distributed.Collectives.agreed``);
  * with ``balance`` each worker repeats samples by systematic rounding of the class repeat
    factors (:mod:`.balance`), so ``len(loader)`` stays exact when the manifest records each
    shard's class counts (``per_class``); for a manifest written before those were recorded it
    is the expected count.

With ``resampled=True`` each worker draws shards with replacement, forever, and the loader stops
after ``ceil(num_samples / (world_size * batch_size))`` batches per rank, the same on every rank.

Pseudo-labelled samples (a ``json`` ``pseudo`` record, :mod:`.pseudo`) scored below
``pseudo_min_score`` are left out and counted in ``loader.pseudo_left_out``; the others train with
their pseudo-label, marked in the batch's ``pseudo`` (the training step weighs them by
``data.pseudo_weight``). ``len(loader)`` counts the manifest's samples, so it is then an upper bound.
The ``unlabelled`` split is read only when asked for by name, with every label -1.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from .balance import repeat_factors
from .formats import UNLABELLED_SPLIT, DataError
from .sources import ShardSpec, resolve_source
from .stream import MAX_REASONS, ShardStream
from .transforms import create_transform, draft_size



@dataclass
class DataInfo:
    num_classes: int  # size of the label space (the union one for the registry)
    class_names: list[str]  # names in label order
    num_samples: int  # samples of the split over all ranks
    samples_per_rank: list[int]  # samples each rank reads per finite epoch (nominal when resampled)
    class_counts: list[int]  # samples per label in the split
    shards: list[ShardSpec] = field(default_factory=list)  # every shard of the split


def assign_shards(shards: list[ShardSpec], world_size: int) -> list[list[ShardSpec]]:
    """Give each rank a fixed set of shards, largest first to the rank with fewest samples."""
    per_rank: list[list[ShardSpec]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for shard in sorted(shards, key=lambda s: (-s.count, s.url)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        per_rank[rank].append(shard)
        loads[rank] += shard.count
    return [sorted(r, key=lambda s: s.url) for r in per_rank]


class ShardLoader:
    """The iterable the trainer uses: batches of this rank for one epoch, plus skip statistics.

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); it reseeds the
    shard order, the shuffle buffer, re-balancing and augmentation. After an epoch, ``skipped`` is
    the number of shards or samples skipped by this rank (all workers) and ``skip_reasons`` the
    first few reasons; when that happens a warning is also printed. ``pseudo_left_out`` counts,
    apart from those, the pseudo-labelled samples scored below the threshold (also printed).

    With ``persistent_workers`` (the default when there are workers) one DataLoader and its worker
    processes serve every epoch: no fork and start-up per pass. The workers read the epoch from
    shared memory, so ``set_epoch`` still reshuffles and reseeds them; leaving an epoch early is
    fine (the next pass starts clean).
    """

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False,
                 persistent_workers: bool = True) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self._data_loader: Optional[DataLoader] = None  # kept between epochs when workers persist
        self.epoch = 0
        self.skipped = 0
        self.skip_reasons: list[str] = []
        self.pseudo_left_out = 0  # pseudo-labelled samples below the stream's pseudo_min_score, this epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch: exact unless samples are skipped, or
        ``balance`` is set and the manifest predates per-shard class counts (then expected)."""
        stream, workers = self.stream, max(1, self.num_workers)
        if stream.resampled:
            return stream.batches_per_rank
        total = 0
        for worker in range(workers):
            n = stream.pass_samples(worker, workers, self.epoch)
            total += n // stream.batch_size if stream.drop_last else math.ceil(n / stream.batch_size)
        return total

    def __iter__(self) -> Iterator[dict]:
        self.stream.epoch = self.epoch
        self.skipped, self.skip_reasons, self.pseudo_left_out = 0, [], 0
        loader = self._data_loader
        if loader is None:
            # The workers reseed themselves every pass (ShardStream.__iter__); a generator of the
            # loader's own keeps DataLoader from drawing its base seed from the caller's RNG.
            loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                generator=torch.Generator(), persistent_workers=self.persistent_workers)
            if self.persistent_workers:
                self._data_loader = loader
        for batch in loader:
            self.skipped += batch.pop("skipped")
            self.pseudo_left_out += batch.pop("pseudo_left_out", 0)
            reasons = batch.pop("skip_reasons")
            self.skip_reasons += reasons[: MAX_REASONS - len(self.skip_reasons)]
            if "images" in batch:
                yield batch
        if self.skipped:
            print(f"mgmoe data: rank {self.stream.rank} epoch {self.epoch}: skipped {self.skipped} "
                  f"bad shard(s)/sample(s); first: {self.skip_reasons[0] if self.skip_reasons else '?'}")
        if self.pseudo_left_out:
            print(f"mgmoe data: rank {self.stream.rank} epoch {self.epoch}: left out {self.pseudo_left_out} "
                  f"pseudo-labelled sample(s) scored below pseudo_min_score = {self.stream.pseudo_min_score}")


def make_loader(
    source: str | Path,
    split: str,
    *,
    batch_size: int,
    img_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    epoch_seed: int = 0,
    resampled: bool = False,
    balance: Optional[str] = None,
    shuffle: Optional[bool] = None,
    shuffle_buffer: int = 1000,
    drop_last: bool = False,
    registry: Optional[str | Path] = None,
    reduced_decode: bool = True,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    handler: Optional[Callable[[BaseException], bool]] = None,
    transform_options: Optional[dict[str, Any]] = None,
    pseudo_min_score: float = 0.0,
) -> tuple[ShardLoader, DataInfo]:
    """Build the loader of one split for one rank.

    Args:
        source: a dataset folder (or its ``manifest.json``), or ``"registry"`` / a registry file,
            whose labels are then the union label space.
        split: ``"train"``, ``"val"``, ``"test"``, or ``"unlabelled"`` (labels -1; no ``balance``).
        batch_size: samples per batch.
        img_size: output resolution in pixels.
        train: timm's training transform (random-resized crop, flip, jitter) if True, else the
            eval transform (resize, centre crop).
        rank: this process's rank; passed explicitly, the data package never asks
            ``torch.distributed``.
        world_size: number of ranks.
        num_workers: DataLoader worker processes of this rank (0: in this process).
        epoch_seed: base seed; with the epoch it seeds shard order, shuffle buffer, re-balancing
            and augmentation.
        resampled: draw shards with replacement forever; each epoch is then a fixed number of
            batches, equal on every rank.
        balance: ``None``, ``"class"`` (uniform over classes) or ``"sqrt"`` (proportional to the
            square root of class counts) re-sampling for long-tailed data.
        shuffle: shuffle shards and samples; default ``train``.
        shuffle_buffer: samples in the shuffle buffer (per worker).
        drop_last: drop each worker's last partial batch.
        registry: registry file when ``source == "registry"``.
        reduced_decode: decode JPEGs at a reduced scale (PIL ``draft``) when the target allows.
        pin_memory: pin batch memory (for GPU training).
        persistent_workers: keep the worker processes between epochs instead of starting new
            ones for every pass (each epoch still reshuffles and reseeds augmentation).
        handler: error policy for bad shards and samples, webdataset-style: called with the
            exception, returns True to skip (skips are counted either way) or False to stop;
            it may also raise. Default: skip and count.
        transform_options: extra keyword arguments for ``timm.data.create_transform``.
        pseudo_min_score: ``data.pseudo_min_score``: a pseudo-labelled sample (:mod:`.pseudo`)
            scored below it is left out (``loader.pseudo_left_out``); one at or above it has its
            pseudo-label and ``pseudo`` True in its batch. In [0, 1]; samples without a
            pseudo-label are unaffected.

    Returns:
        ``(loader, info)``: iterate ``loader`` for batches ``{"images": (B, 3, H, W) float,
        "labels": (B,) long, "keys": list[str], "boxes": (B, 4) float32, "has_box": (B,) bool,
        "pseudo": (B,) bool}``
        (``boxes``: each sample's bounding box ``(x1, y1, x2, y2)`` normalised to [0, 1] on the
        output image, moved with the image by every crop, resize and flip; zeros with ``has_box``
        False where a sample has no box, the crop left none of it, or the transform cannot move
        boxes: see :class:`.stream.ShardStream`); ``info`` describes the label space and counts.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank = {rank}: expected 0 <= rank < world_size = {world_size}")
    if batch_size < 1:
        raise DataError(f"batch_size = {batch_size}: expected an integer >= 1")
    if not 0.0 <= pseudo_min_score <= 1.0:
        raise DataError(f"pseudo_min_score = {pseudo_min_score}: expected a score in [0, 1]")
    if split == UNLABELLED_SPLIT and balance is not None:
        raise DataError(f"{source}: balance = {balance!r}: the {UNLABELLED_SPLIT} split has no classes to balance")
    shards, classes, class_counts = resolve_source(source, split, registry)
    per_rank = assign_shards(shards, world_size)
    if not resampled and not per_rank[rank]:
        warnings.warn(f"{source}: split {split!r} has {len(shards)} shard(s) for {world_size} ranks: rank {rank} "
                      f"gets none; rebuild with a smaller --shard-size")
    elif not resampled and len(per_rank[rank]) < num_workers:
        warnings.warn(f"{source}: split {split!r} has {len(per_rank[rank])} shard(s) for rank {rank} but "
                      f"{num_workers} workers: some workers stay idle; rebuild with a smaller --shard-size")
    num_samples = sum(s.count for s in shards)
    options = dict(transform_options or {})
    stream = ShardStream(
        per_rank[rank],
        shards,
        rank=rank,
        batch_size=batch_size,
        transform=create_transform(img_size, train, **options),
        min_side=draft_size(img_size, options.get("crop_pct")) if reduced_decode else None,
        shuffle=train if shuffle is None else shuffle,
        shuffle_buffer=shuffle_buffer,
        epoch_seed=epoch_seed,
        resampled=resampled,
        batches_per_rank=math.ceil(num_samples / (world_size * batch_size)),
        factors=repeat_factors(class_counts, balance),
        class_counts=class_counts,
        drop_last=drop_last,
        handler=handler,
        labelled=split != UNLABELLED_SPLIT,
        pseudo_min_score=pseudo_min_score,
    )
    samples_per_rank = ([stream.batches_per_rank * batch_size] * world_size if resampled
                        else [sum(s.count for s in r) for r in per_rank])
    info = DataInfo(
        num_classes=len(classes),
        class_names=classes,
        num_samples=num_samples,
        samples_per_rank=samples_per_rank,
        class_counts=class_counts,
        shards=shards,
    )
    return ShardLoader(stream, num_workers, pin_memory, persistent_workers), info
