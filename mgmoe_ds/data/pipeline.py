"""The streaming input pipeline: shards -> decoded, transformed, batched tensors.

One call, :func:`make_loader`, gives the training job an iterable of batches and a
:class:`DataInfo`. Inside each DataLoader worker the pipeline is a webdataset ``DataPipeline`` of
small stages: this worker's shard list, tar reading (:mod:`.tar_reader`), optional class
re-balancing, a shuffle buffer, decode + per-image transform (uint8 tensors), batching with the
conversion to normalised floats done once per batch, written straight into shared memory so that
handing the batch to the main process copies nothing. Errors are a parameter (``handler``): by
default a bad shard or sample is skipped and counted, and the count travels with the batches, so
after an epoch ``loader.skipped`` is the total over all workers of this rank.

What the loader guarantees (``resampled=False``, finite epochs):
  * shards are assigned to ranks once, greedily by sample count, so rank ``r`` always reads the
    same shards (``DataInfo.samples_per_rank``); within a rank the shard order is reshuffled each
    epoch (``set_epoch``) and split between workers;
  * every sample of the split is read exactly once per epoch over all ranks and workers;
  * ranks can get different numbers of samples and batches (``len(loader)`` is this rank's
    count for the current epoch; each worker ends with its own partial batch unless
    ``drop_last``). A trainer that needs equal step counts uses ``resampled=True``, or stops
    every rank at the smallest ``len`` over ranks;
  * with ``balance`` each worker repeats samples by systematic rounding of the class repeat
    factors (:mod:`.balance`), so ``len(loader)`` stays exact when the manifest records each
    shard's class counts (``per_class``); for a manifest written before those were recorded it
    is the expected count.

With ``resampled=True`` each worker draws shards with replacement, forever, and the loader stops
after ``ceil(num_samples / (world_size * batch_size))`` batches per rank, the same on every rank.
"""

from __future__ import annotations

import functools
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .balance import balance_offsets, pass_length, repeat_factors, stable_seed, systematic_copies
from .formats import IMAGE_EXTENSIONS, DataError
from .registry import DEFAULT_REGISTRY, dataset_path, load_registry, union_label_map
from .shards import load_manifest
from .tar_reader import tar_samples
from .transforms import ImageTransform, create_transform, decode_image_tensor, draft_size

MAX_REASONS = 20  # skip reasons kept per epoch (the count is always exact)


@dataclass(frozen=True)
class ShardSpec:
    url: str  # path of the tar file
    count: int  # samples in it, from the manifest
    label_map: Optional[tuple[int, ...]] = None  # dataset class index -> union index (registry only)
    class_counts: Optional[tuple[tuple[int, int], ...]] = None  # (label, samples), loader labels; None: old manifest


@dataclass
class DataInfo:
    num_classes: int  # size of the label space (the union one for the registry)
    class_names: list[str]  # names in label order
    num_samples: int  # samples of the split over all ranks
    samples_per_rank: list[int]  # samples each rank reads per finite epoch (nominal when resampled)
    class_counts: list[int]  # samples per label in the split
    shards: list[ShardSpec] = field(default_factory=list)  # every shard of the split


class SkipCounter:
    """A ``handler=`` that counts and remembers exceptions instead of raising them.

    Calling it records the exception and returns True (skip and go on). ``take()`` returns what
    was recorded since the last call, which the batching stage attaches to the next batch.
    """

    def __init__(self) -> None:
        self.count = 0
        self.reasons: list[str] = []

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(f"{type(exn).__name__}: {exn}".splitlines()[0][:300])
        return True

    def take(self) -> tuple[int, list[str]]:
        count, reasons = self.count, self.reasons
        self.count, self.reasons = 0, []
        return count, reasons


def resolve_source(
    source: str | Path, split: str, registry: Optional[str | Path] = None
) -> tuple[list[ShardSpec], list[str], list[int]]:
    """Find the shards, class names and per-class counts of ``split``.

    Args:
        source: a dataset folder (or its ``manifest.json``), or ``"registry"`` / a registry
            ``.json`` file for every registered dataset under the union label space.
        split: ``"train"``, ``"val"`` or ``"test"``.
        registry: the registry file when ``source == "registry"``; default ``shards/registry.json``.

    Returns:
        ``(shards, class_names, class_counts)``.
    """
    source_path = Path(source)
    if str(source) == "registry" or (source_path.suffix == ".json" and source_path.name != "manifest.json"):
        registry_path = Path(registry or DEFAULT_REGISTRY) if str(source) == "registry" else source_path
        registry_data = load_registry(registry_path)
        if not registry_data["datasets"]:
            raise DataError(f"{registry_path}: no datasets registered; run `mgmoe shards register DIR/NAME`")
        classes = list(registry_data["classes"])
        counts = [0] * len(classes)
        shards = []
        for name, entry in sorted(registry_data["datasets"].items()):
            folder = dataset_path(registry_path, entry)
            manifest = load_manifest(folder)
            label_map = tuple(union_label_map(registry_data, manifest["classes"]))
            for species, n in manifest["counts"].get(split, {}).get("per_class", {}).items():
                counts[classes.index(species)] += n
            shards += [ShardSpec(str(folder / s["path"]), s["count"], label_map,
                                 shard_class_counts(s, label_map, len(classes), folder))
                       for s in manifest["shards"] if s["split"] == split]
    else:
        folder = source_path.parent if source_path.is_file() else source_path
        manifest = load_manifest(source_path)
        classes = list(manifest["classes"])
        per_class = manifest["counts"].get(split, {}).get("per_class", {})
        counts = [per_class.get(name, 0) for name in classes]
        shards = [ShardSpec(str(folder / s["path"]), s["count"], None, shard_class_counts(s, None, len(classes), folder))
                  for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise DataError(f"{source}: no shards for split {split!r}")
    return shards, classes, counts


def shard_class_counts(
    entry: dict[str, Any], label_map: Optional[tuple[int, ...]], num_classes: int, folder: Path
) -> Optional[tuple[tuple[int, int], ...]]:
    """A manifest shard entry's ``per_class`` as sorted ``(label, samples)`` pairs in the loader's
    label space (through ``label_map`` for registry datasets); None when the entry has none.

    Args:
        entry: one item of the manifest's ``"shards"``.
        label_map: dataset class index -> union index, or None.
        num_classes: size of the loader's label space (the dataset's own without ``label_map``).
        folder: the dataset folder, for error messages.

    Returns:
        The pairs, or None for a manifest written before per-shard class counts.
    """
    per_class = entry.get("per_class")
    if per_class is None:
        return None
    labels_known = len(label_map) if label_map is not None else num_classes
    counts: dict[int, int] = {}
    for key, n in per_class.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < labels_known):
            raise DataError(f"{folder / 'manifest.json'}: shard {entry['path']}: per_class key {key!r}: "
                            f"expected a label index 0..{labels_known - 1} as a string")
        label = label_map[int(key)] if label_map is not None else int(key)
        counts[label] = counts.get(label, 0) + int(n)
    return tuple(sorted(counts.items()))


def assign_shards(shards: list[ShardSpec], world_size: int) -> list[list[ShardSpec]]:
    """Give each rank a fixed set of shards, largest first to the rank with fewest samples."""
    per_rank: list[list[ShardSpec]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for shard in sorted(shards, key=lambda s: (-s.count, s.url)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        per_rank[rank].append(shard)
        loads[rank] += shard.count
    return [sorted(r, key=lambda s: s.url) for r in per_rank]


class ShardStream(IterableDataset):
    """The per-worker pipeline as an IterableDataset of ready batches (dicts).

    Each batch is ``{"images": (B, 3, H, W) float, "labels": (B,) long, "keys": list[str],
    "skipped": int, "skip_reasons": list[str]}``; a batch without ``"images"`` carries only
    skip counts left at the end of a worker's stream.
    """

    def __init__(
        self,
        rank_shards: list[ShardSpec],
        all_shards: list[ShardSpec],
        *,
        rank: int,
        batch_size: int,
        transform: ImageTransform,
        min_side: Optional[int],
        shuffle: bool,
        shuffle_buffer: int,
        epoch_seed: int,
        resampled: bool,
        batches_per_rank: int,
        factors: Optional[np.ndarray],
        class_counts: list[int],
        drop_last: bool,
        handler: Optional[Callable[[BaseException], bool]],
    ) -> None:
        super().__init__()
        self.rank_shards, self.all_shards, self.rank = rank_shards, all_shards, rank
        self.batch_size, self.transform, self.min_side = batch_size, transform, min_side
        self.shuffle, self.shuffle_buffer, self.epoch_seed = shuffle, shuffle_buffer, epoch_seed
        self.resampled, self.batches_per_rank, self.factors = resampled, batches_per_rank, factors
        self.drop_last, self.handler = drop_last, handler
        # Expected copies of a sample drawn from the split: what a shard without per-class counts
        # contributes per sample to a balanced pass (1 as long as the factors keep the epoch length).
        counts = np.asarray(class_counts, dtype=np.float64)  # (C,)
        self.copies_per_sample = float(counts @ factors / counts.sum()) if factors is not None else 1.0
        self.label_maps = {s.url: s.label_map for s in all_shards}
        # The epoch lives in shared memory: persistent workers, forked once, read the value the
        # main process set before each pass.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def worker_shards(self, worker: int, num_workers: int, epoch: int) -> list[ShardSpec]:
        """This rank's shards for ``epoch`` (finite mode), then this worker's share of them."""
        shards = list(self.rank_shards)
        if self.shuffle:
            random.Random(stable_seed(self.epoch_seed, epoch, self.rank)).shuffle(shards)
        return shards[worker::num_workers]

    def pass_samples(self, worker: int, num_workers: int, epoch: int) -> int:
        """Samples one worker's finite pass of ``epoch`` yields when none is skipped.

        With ``balance`` it is exact when every shard has per-class counts in the manifest: the
        sum over classes of ``floor(m_c * f_c + u_c)`` (:mod:`.balance`), with the offsets the
        worker's pass draws. Shards of an older manifest count as their number of samples times
        the split's expected copies per sample, so the result is then an expectation, rounded.
        """
        shards = self.worker_shards(worker, num_workers, epoch)
        if self.factors is None:
            return sum(s.count for s in shards)
        per_class = np.zeros(len(self.factors), dtype=np.int64)  # (C,) samples of each class in the pass
        uncounted = 0  # samples of shards without per-class counts
        for shard in shards:
            if shard.class_counts is None:
                uncounted += shard.count
            for label, n in shard.class_counts or ():
                per_class[label] += n
        if uncounted:
            return round(float(per_class @ self.factors) + uncounted * self.copies_per_sample)
        offsets = balance_offsets(self.epoch_seed, epoch, self.rank, worker, len(self.factors))  # (C,)
        return pass_length(per_class, self.factors, offsets)

    def worker_batches(self, worker: int, num_workers: int) -> int:
        """The resampled mode's batch quota of one worker."""
        base, extra = divmod(self.batches_per_rank, num_workers)
        return base + (worker < extra)

    def _shard_urls(self, worker: int, num_workers: int, epoch: int) -> Iterator[dict]:
        if not self.resampled:
            for shard in self.worker_shards(worker, num_workers, epoch):
                yield {"url": shard.url}
            return
        rng = random.Random(stable_seed(self.epoch_seed, epoch, self.rank, worker, "shards"))
        while True:
            yield {"url": rng.choice(self.all_shards).url}

    def _label(self, sample: dict) -> int:
        label = int(sample["cls"])
        label_map = self.label_maps.get(sample["__url__"])
        return label_map[label] if label_map is not None else label

    def _rebalance(self, offsets: np.ndarray, handler: Callable[[BaseException], bool]
                   ) -> Callable[[Iterator[dict]], Iterator[dict]]:
        # Systematic rounding per class instead of a coin flip per sample: less variance, and the
        # pass has a length known in advance, which ``len(loader)`` computes (see :mod:`.balance`).
        def stage(samples: Iterator[dict]) -> Iterator[dict]:
            seen = [0] * len(self.factors)  # samples of each class so far in this pass
            for sample in samples:
                try:
                    label = self._label(sample)
                    factor = float(self.factors[label])
                except Exception as exn:  # a sample without a usable cls is skipped by the handler
                    if not handler(exn):
                        raise
                    continue
                copies = systematic_copies(seen[label], factor, float(offsets[label]))
                seen[label] += 1
                for _ in range(copies):
                    yield sample
        return stage

    def _decode(self, sample: dict) -> tuple[torch.Tensor, int, str]:
        image_keys = [k for k in sample if k in IMAGE_EXTENSIONS]
        if len(image_keys) != 1:
            raise ValueError(f"{sample.get('__url__')}: {sample.get('__key__')}: expected one image, got {sorted(sample)}")
        image = decode_image_tensor(sample[image_keys[0]], self.min_side)  # (3, H, W) uint8
        return self.transform.augment(image), self._label(sample), sample["__key__"]  # (3, H', W')

    def _batches(self, counter: SkipCounter, quota: Optional[int]) -> Callable[[Iterator], Iterator[dict]]:
        def stage(samples: Iterator[tuple[torch.Tensor, int, str]]) -> Iterator[dict]:
            made, buffer = 0, []
            for sample in samples:
                if quota is not None and made >= quota:
                    break
                buffer.append(sample)
                if len(buffer) == self.batch_size:
                    yield self._collate(buffer, counter)
                    made, buffer = made + 1, []
            if quota is not None and made >= quota:
                buffer = []
            if buffer and not self.drop_last:
                yield self._collate(buffer, counter)
            elif counter.count:
                count, reasons = counter.take()
                yield {"skipped": count, "skip_reasons": reasons}
        return stage

    def _collate(self, buffer: list, counter: SkipCounter) -> dict:
        images, labels, keys = zip(*buffer)
        out = torch.empty((len(images), *images[0].shape), dtype=torch.float32)  # (B, 3, H, W)
        if get_worker_info() is not None:  # the batch goes to the main process: build it in shared memory
            out.share_memory_()
        count, reasons = counter.take()
        return {
            "images": self.transform.collate(list(images), out),  # (B, 3, H, W)
            "labels": torch.tensor(labels, dtype=torch.long),  # (B,)
            "keys": list(keys),
            "skipped": count,
            "skip_reasons": reasons,
        }

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter()
        if self.handler is None:
            handler = counter
        else:
            def handler(exn: BaseException, user=self.handler) -> bool:
                keep_going = user(exn)
                if keep_going:
                    counter(exn)
                return keep_going
        epoch = self.epoch  # read once: the shared value may move on while this pass runs
        seed = stable_seed(self.epoch_seed, epoch, self.rank, worker)
        if info is not None:
            # Augmentation draws from the worker's global RNGs (timm uses ``random`` and, for
            # RandAugment, NumPy; torchvision ``torch``), which DataLoader seeds once per worker
            # start. A persistent worker would carry them over from the last epoch, so each pass
            # reseeds them from (epoch, rank, worker): the same images whether or not the workers
            # persist. In the main process (no workers) the caller's RNGs are left alone.
            random.seed(seed + 2)
            np.random.seed((seed + 2) % 2**32)
            torch.manual_seed(seed + 2)
        quota = self.worker_batches(worker, num_workers) if self.resampled else None
        pipeline = wds.DataPipeline(
            lambda: self._shard_urls(worker, num_workers, epoch),
            functools.partial(tar_samples, handler=handler),
            self._rebalance(balance_offsets(self.epoch_seed, epoch, self.rank, worker, len(self.factors)), handler)
            if self.factors is not None else None,
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=random.Random(seed))
            if self.shuffle and self.shuffle_buffer > 1 else None,
            wds.map(self._decode, handler=handler),
            self._batches(counter, quota),
        )
        return iter(pipeline)


class ShardLoader:
    """The iterable the trainer uses: batches of this rank for one epoch, plus skip statistics.

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); it reseeds the
    shard order, the shuffle buffer, re-balancing and augmentation. After an epoch, ``skipped`` is
    the number of shards or samples skipped by this rank (all workers) and ``skip_reasons`` the
    first few reasons; when that happens a warning is also printed.

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
        self.skipped, self.skip_reasons = 0, []
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
            reasons = batch.pop("skip_reasons")
            self.skip_reasons += reasons[: MAX_REASONS - len(self.skip_reasons)]
            if "images" in batch:
                yield batch
        if self.skipped:
            print(f"mgmoe data: rank {self.stream.rank} epoch {self.epoch}: skipped {self.skipped} "
                  f"bad shard(s)/sample(s); first: {self.skip_reasons[0] if self.skip_reasons else '?'}")


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
) -> tuple[ShardLoader, DataInfo]:
    """Build the loader of one split for one rank.

    Args:
        source: a dataset folder (or its ``manifest.json``), or ``"registry"`` / a registry file,
            whose labels are then the union label space.
        split: ``"train"``, ``"val"`` or ``"test"``.
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

    Returns:
        ``(loader, info)``: iterate ``loader`` for batches ``{"images": (B, 3, H, W) float,
        "labels": (B,) long, "keys": list[str]}``; ``info`` describes the label space and counts.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank = {rank}: expected 0 <= rank < world_size = {world_size}")
    if batch_size < 1:
        raise DataError(f"batch_size = {batch_size}: expected an integer >= 1")
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
