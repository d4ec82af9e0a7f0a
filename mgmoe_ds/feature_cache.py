"""Backbone features computed once per sample and view, for stages that train with a frozen backbone.

While the backbone is frozen its outputs for a sample change only with the sample's transform,
so the router and the experts can train from stored features instead of images: the backbone's
forward (most of the compute) runs once per sample and view instead of once per step.

- The key (:func:`cache_key`) is a sha256 of everything the stored values depend on: the
  backbone's weights (those below the cut, for a cache at a depth) and the depth, the
  transform's repr, the dataset's manifest bytes, the feature names, this rank's share of the
  shards (rank and world size), the number of views, the storage dtype and the augmentation
  seed. A cache whose key differs is never read.
- Storage (:class:`FeatureCache`): per feature one ``(V, N, ...)`` array (V views, N samples of
  this rank) and an ``(N,)`` label vector; in memory when the cache fits under the memory limit,
  else ``.npy`` memory maps in ``ROOT/<key>/`` with an ``index.json`` written last (a folder
  without it is an unfinished build and is rebuilt).
- Iteration (:meth:`FeatureCache.batches`): a permutation seeded per epoch and, with V > 1, a
  view drawn per sample per epoch.

Only torch, NumPy and the data package; no ``torch.distributed`` (each rank caches its own shards).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# NumPy has no bfloat16: its bits are stored as uint16 and viewed back on read.
_NUMPY_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
INDEX_FILE = "index.json"
KEYS_FILE = "keys.json"

Array = Union[Tensor, np.ndarray]


class FeatureCacheError(RuntimeError):
    """The cache cannot be built or read; the message says which file or sample."""


# ---------------------------------------------------------------------------------------------
# The key


def weights_digest(backbone: nn.Module) -> str:
    """The sha256 (hex) of every tensor of ``backbone``'s state dict (name, dtype, shape, bytes),
    buffers included (BatchNorm statistics change the features too)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def cache_key(weights: str, *, transform: str, manifest: bytes, split: str, features: Iterable[str],
              rank: int, world_size: int, views: int, dtype: str, seed: int, depth: Optional[int] = None) -> str:
    """The sha256 (hex) of what cached features depend on.

    Args:
        weights: :func:`weights_digest` of the frozen backbone (hashed once by the caller, which
            keys several caches with the same weights).
        transform: the repr of the transform the features were computed from (it shows the
            resolution, crop, interpolation and normalisation), plus anything else the caller
            wants keyed (e.g. the input dtype).
        manifest: the dataset's content bytes (``data.DatasetSource.content_bytes``).
        split: the dataset split the cache holds.
        features: names of the cached features.
        rank, world_size: this rank's share of the shards.
        views: augmented views per sample (1: the eval transform).
        dtype: storage dtype name.
        seed: seeds the augmentation of the views.
        depth: the backbone block after which the cached activation was taken (None: the
            backbone's outputs are cached).
    """
    digest = hashlib.sha256(weights.encode())
    meta = {"transform": transform, "split": split, "features": sorted(features), "rank": rank, "world_size": world_size,
            "views": views, "dtype": dtype, "seed": seed if views > 1 else None}
    if depth is not None:  # absent otherwise, so the keys of end-of-backbone caches stay as they were
        meta["depth"] = depth
    digest.update(json.dumps(meta, sort_keys=True).encode())
    digest.update(hashlib.sha256(manifest).digest())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The cache


@dataclass
class FeatureCache:
    """Cached features of one rank's samples.

    ``features[name]`` is ``(V, N, ...)`` (a tensor in memory, or a read-only NumPy memory map);
    ``labels`` is ``(N,)`` and ``keys`` the N sample keys (what a teacher's stored predictions
    are looked up by, ``train.distill``).
    """

    key: str
    features: dict[str, Array]
    labels: Tensor  # (N,) long
    dtype: str  # storage dtype name, a key of CACHE_DTYPES
    folder: Optional[Path] = None  # the memory maps' folder; None in memory
    keys: list[str] = field(default_factory=list)  # (N,) sample keys in row order

    @property
    def storage(self) -> str:
        return "memory" if self.folder is None else "memmap"

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_views(self) -> int:
        return int(next(iter(self.features.values())).shape[0])

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) for a in self.features.values()) * _itemsize(self.dtype)

    def gather(self, indices: Tensor, views: Tensor) -> dict[str, Tensor]:
        """Features of samples ``indices`` (B,) in views ``views`` (B,): dict of (B, ...) tensors."""
        out = {}
        for name, array in self.features.items():
            if isinstance(array, Tensor):
                out[name] = array[views, indices]  # (B, ...)
            else:
                values = torch.from_numpy(np.ascontiguousarray(array[views.numpy(), indices.numpy()]))  # (B, ...)
                out[name] = values.view(torch.bfloat16) if self.dtype == "bfloat16" else values
        return out

    def batches(self, batch_size: int, num_batches: int, *, seed: int, epoch: int,
                start: int = 0) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """``num_batches`` batches of ``(features, labels)`` in an order drawn from ``(seed, epoch)``;
        :meth:`epoch_rows` says which rows and views, its arguments are these."""
        for rows, views in self.epoch_rows(batch_size, num_batches, seed=seed, epoch=epoch, start=start):
            yield self.gather(rows, views), self.labels[rows]

    def epoch_rows(self, batch_size: int, num_batches: int, *, seed: int, epoch: int,
                   start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """``num_batches`` batches of ``(rows, views)``, each (B,): the samples in an order drawn
        from ``(seed, epoch)`` and the view each shows.

        Args:
            batch_size: samples per batch (the last batch of an epoch may be smaller).
            num_batches: batches in the epoch; fewer than this cache holds truncates it, more
                wraps around the permutation (so every rank can be given the same count).
            seed, epoch: seed the sample order and, with several views, each sample's view.
            start: the first batch to yield (resuming inside an epoch); skipped batches are
                not read.
        """
        n = self.num_samples
        if n == 0:
            raise FeatureCacheError(f"feature cache {self.key[:12]}: no samples cached")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator)  # (N,)
        views = torch.randint(self.num_views, (n,), generator=generator)  # (N,) the view each sample shows
        total = min(num_batches * batch_size, max(n, (num_batches - 1) * batch_size + 1))
        positions = torch.arange(total) % n  # wraps only when the epoch has more slots than samples
        for b in range(start, num_batches):
            chosen = order[positions[b * batch_size:(b + 1) * batch_size]]  # (B,)
            yield chosen, views[chosen]


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=CACHE_DTYPES[dtype]).element_size()


def load_feature_cache(folder: Path) -> Optional[FeatureCache]:
    """The memory-mapped cache in ``folder``, or None when it is missing or unfinished."""
    index_path = folder / INDEX_FILE
    if not index_path.is_file() or not (folder / KEYS_FILE).is_file():  # no keys: written by an earlier version
        return None
    index = json.loads(index_path.read_text())
    n = index["num_samples"]
    features = {name: np.load(folder / f"{name}.npy", mmap_mode="r")[:, :n] for name in index["features"]}
    labels = torch.from_numpy(np.load(folder / "labels.npy")[:n].astype(np.int64))
    keys = json.loads((folder / KEYS_FILE).read_text())[:n]
    return FeatureCache(index["key"], features, labels, index["dtype"], folder, keys)


class _Writer:
    """Fills the ``(V, capacity, ...)`` arrays of a cache being built, in memory or as memory maps."""

    def __init__(self, key: str, first: dict[str, Tensor], *, views: int, capacity: int, dtype: str,
                 memory_limit_bytes: int, folder: Path) -> None:
        self.key, self.dtype, self.capacity = key, dtype, capacity
        per_sample = sum(t[0].numel() for t in first.values()) * _itemsize(dtype) * views
        self.in_memory = per_sample * capacity <= memory_limit_bytes
        self.folder = None if self.in_memory else folder
        self.arrays: dict[str, Array] = {}
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)  # an unfinished build of the same key
            self.folder.mkdir(parents=True)
        for name, t in first.items():
            shape = (views, capacity, *t.shape[1:])
            if self.in_memory:
                self.arrays[name] = torch.zeros(shape, dtype=CACHE_DTYPES[dtype])
            else:
                self.arrays[name] = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+",
                                                              dtype=_NUMPY_STORAGE[dtype], shape=shape)
        self.labels = np.zeros(capacity, dtype=np.int64)

    def write(self, view: int, rows: np.ndarray, features: dict[str, Tensor], labels: Tensor) -> None:
        for name, array in self.arrays.items():
            values = features[name].detach().to("cpu", CACHE_DTYPES[self.dtype])
            if isinstance(array, Tensor):
                array[view, torch.from_numpy(rows)] = values
            else:
                array[view, rows] = (values.view(torch.uint16) if self.dtype == "bfloat16" else values).numpy()
        if view == 0:
            self.labels[rows] = labels.numpy()

    def finish(self, keys: list[str]) -> FeatureCache:
        num_samples = len(keys)
        if self.in_memory:
            features = {name: a[:, :num_samples] for name, a in self.arrays.items()}
            return FeatureCache(self.key, features, torch.from_numpy(self.labels[:num_samples]), self.dtype, keys=keys)
        for array in self.arrays.values():
            array.flush()
        np.save(self.folder / "labels.npy", self.labels[:num_samples])
        (self.folder / KEYS_FILE).write_text(json.dumps(keys))
        index = {"key": self.key, "num_samples": num_samples, "dtype": self.dtype,
                 "features": {name: list(a.shape[2:]) for name, a in self.arrays.items()}}
        tmp = self.folder / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.folder / INDEX_FILE)  # written last: its presence means complete
        self.arrays.clear()
        return load_feature_cache(self.folder)


class FeatureCacheStore:
    """Finds or builds the cache for a key, and keeps one cache per slot in memory so consecutive
    stages share them (slots: e.g. the training views, the validation split).

    When a slot's cache is replaced by one of another key (the backbone changed between stages),
    the replaced cache is dropped before the new one is allocated, and its memory-mapped folder,
    stale from then on, is deleted.

    Args:
        root: folder of the memory-mapped caches (``RUN/feature_cache``, or ``cache.dir``).
        dtype: storage dtype name (a key of ``CACHE_DTYPES``).
        memory_limit_bytes: a cache larger than this (this rank's share) is memory-mapped.
        progress: show a progress bar while building.
        delete_replaced: delete a replaced cache's files (False for a folder shared by several
            runs, where another run may still want them).
    """

    def __init__(self, root: Path, *, dtype: str = "float16", memory_limit_bytes: int = 8 << 30,
                 progress: bool = False, delete_replaced: bool = True) -> None:
        if dtype not in CACHE_DTYPES:
            raise FeatureCacheError(f"cache dtype {dtype!r}: expected one of {', '.join(CACHE_DTYPES)}")
        self.root, self.dtype = Path(root), dtype
        self.memory_limit_bytes, self.progress = memory_limit_bytes, progress
        self.delete_replaced = delete_replaced
        self.slots: dict[str, FeatureCache] = {}
        self.builds = 0  # caches built (not found) by this store

    def get(self, key: str, *, views: int, capacity: int, view_batches: Callable[[int], Iterable[dict]],
            compute: Callable[[Tensor], dict[str, Tensor]], slot: str = "train",
            description: str = "feature cache") -> tuple[FeatureCache, bool]:
        """The cache of ``key``: the one in memory, the one on disk, or a new build.

        Args:
            key: :func:`cache_key` of the wanted cache.
            views: views per sample.
            capacity: an upper bound on this rank's samples (the manifest's count).
            view_batches: ``view -> batches {"images", "labels", "keys"}`` of this rank's samples
                in a deterministic order (view 0: the eval transform when ``views == 1``).
            compute: images -> the features to cache (under ``no_grad``, the backbone in eval mode).
            slot: which of the store's caches this one replaces.
            description: the progress bar's label.

        Returns:
            ``(cache, reused)``.
        """
        held = next((cache for cache in self.slots.values() if cache.key == key), None)
        if held is not None:
            self.slots[slot] = held
            return held, True
        self._drop(slot)
        found = load_feature_cache(self.root / key)
        if found is not None and found.key == key:
            self.slots[slot] = found
            return found, True
        self.slots[slot] = self._build(key, views, capacity, view_batches, compute, description)
        self.builds += 1
        return self.slots[slot], False

    def _drop(self, slot: str) -> None:
        replaced = self.slots.pop(slot, None)
        if replaced is None or any(cache.key == replaced.key for cache in self.slots.values()):
            return
        if replaced.folder is not None and self.delete_replaced:
            replaced.features.clear()  # close the memory maps before their files go
            shutil.rmtree(replaced.folder, ignore_errors=True)

    @torch.no_grad()
    def _build(self, key: str, views: int, capacity: int, view_batches: Callable[[int], Iterable[dict]],
               compute: Callable[[Tensor], dict[str, Tensor]], description: str) -> FeatureCache:
        from tqdm.auto import tqdm

        bar = tqdm(total=capacity * views, desc=description, unit="img", disable=not self.progress,
                   dynamic_ncols=True)
        writer: Optional[_Writer] = None
        order: list[str] = []  # sample keys in row order, fixed by view 0; later views must match it
        for view in range(views):
            position = 0
            for batch in view_batches(view):
                keys = list(batch["keys"])
                if view == 0:
                    if len(order) + len(keys) > capacity:
                        raise FeatureCacheError(f"feature cache {key[:12]}: more samples than the manifest's "
                                                f"{capacity} for this rank; the dataset changed under its manifest")
                    order += keys
                elif keys != order[position:position + len(keys)]:
                    raise FeatureCacheError(f"feature cache {key[:12]}: view {view} reads the samples in another "
                                            f"order than view 0 (at sample {position}); the loader must not shuffle")
                features = compute(batch["images"])
                if writer is None:
                    writer = _Writer(key, features, views=views, capacity=capacity, dtype=self.dtype,
                                     memory_limit_bytes=self.memory_limit_bytes, folder=self.root / key)
                rows = np.arange(position, position + len(keys), dtype=np.int64)
                writer.write(view, rows, features, batch["labels"])
                position += len(keys)
                bar.update(len(keys))
        bar.close()
        if writer is None:
            raise FeatureCacheError(f"feature cache {key[:12]}: this rank has no training sample to cache")
        return writer.finish(order)


def describe(cache: FeatureCache) -> str:
    """One line describing a cache for the log."""
    size = cache.nbytes / 2**20
    return (f"{cache.num_samples} samples x {cache.num_views} view(s), {size:.1f} MiB {cache.dtype} "
            f"in {cache.storage}" + (f" ({cache.folder})" if cache.folder is not None else ""))


def batches_per_epoch(num_samples: int, batch_size: int) -> int:
    """Batches of a cached epoch of ``num_samples`` samples."""
    return math.ceil(num_samples / batch_size)

