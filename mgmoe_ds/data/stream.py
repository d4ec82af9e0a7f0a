"""The per-worker pipeline: this worker's shards -> decoded, transformed batches in shared memory.

Inside each DataLoader worker the pipeline is a webdataset ``DataPipeline`` of small stages: this
worker's shard list, tar reading (:mod:`.tar_reader`), the pseudo-label threshold (:mod:`.pseudo`),
optional class re-balancing, a shuffle buffer, decode + per-image transform (uint8 tensors, each
sample's bounding box moved along with its image), batching with the conversion to normalised
floats done once per batch, written straight into shared memory so that handing the batch to the
main process copies nothing. Errors are a parameter (``handler``): by default a bad shard or
sample is skipped and counted, and the count travels with the batches, as does the count of
pseudo-labelled samples left out.
"""

from __future__ import annotations

import functools
import json
import random
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .balance import balance_offsets, pass_length, stable_seed, systematic_copies
from .boxes import box_from_json, decoded_scale, scale_box
from .formats import IMAGE_EXTENSIONS
from .pseudo import PSEUDO_LABEL_KEY, PseudoLabelFilter
from .sources import ShardSpec
from .tar_reader import tar_samples
from .transforms import ImageTransform, decode_image_tensor, image_size

MAX_REASONS = 20  # skip reasons kept per epoch (the count is always exact)


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


class ShardStream(IterableDataset):
    """The per-worker pipeline as an IterableDataset of ready batches (dicts).

    Each batch is ``{"images": (B, 3, H, W) float, "labels": (B,) long, "keys": list[str],
    "boxes": (B, 4) float32, "has_box": (B,) bool, "pseudo": (B,) bool, "skipped": int,
    "skip_reasons": list[str], "pseudo_left_out": int}``; a batch without ``"images"`` carries only
    the counts left at the end of a worker's stream. ``labels`` are -1 in the unlabelled split
    (``labelled`` False); elsewhere a sample kept by the pseudo-label threshold has its pseudo-label
    (:mod:`.pseudo`) and ``pseudo`` True (False for every other sample).
    ``boxes`` holds each sample's bounding box ``(x1, y1, x2, y2)`` normalised to [0, 1] on the
    output image, moved by every crop, resize and flip of the transform; its row is zeros and
    ``has_box`` False for a sample without a box (``json`` bbox null or absent), one whose box
    the crop left nothing of, and every sample under a transform that cannot move boxes
    (``ImageTransform.moves_boxes`` False).
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
        labelled: bool = True,
        pseudo_min_score: float = 0.0,
    ) -> None:
        super().__init__()
        self.rank_shards, self.all_shards, self.rank = rank_shards, all_shards, rank
        self.batch_size, self.transform, self.min_side = batch_size, transform, min_side
        self.shuffle, self.shuffle_buffer, self.epoch_seed = shuffle, shuffle_buffer, epoch_seed
        self.resampled, self.batches_per_rank, self.factors = resampled, batches_per_rank, factors
        self.drop_last, self.handler = drop_last, handler
        self.labelled, self.pseudo_min_score, self.num_classes = labelled, pseudo_min_score, len(class_counts)
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
        if not self.labelled:
            return -1
        label = sample[PSEUDO_LABEL_KEY] if PSEUDO_LABEL_KEY in sample else int(sample["cls"])
        label_map = self.label_maps.get(sample["__url__"])
        return label_map[label] if label_map is not None else label

    def _dataset_labels(self, url: str) -> int:
        """The size of the class list of the dataset that the shard ``url`` belongs to."""
        label_map = self.label_maps.get(url)
        return len(label_map) if label_map is not None else self.num_classes

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

    def _decoded_box(self, sample: dict, data: bytes, image: torch.Tensor) -> Optional[torch.Tensor]:
        """The sample's ``json`` bbox (pixels of the stored image at full size) as a (4,) xyxy box
        in pixels of ``image``, its decode (maybe at a reduced scale); None without one."""
        if "json" not in sample or not self.transform.moves_boxes:
            return None
        try:
            meta = json.loads(sample["json"])
        except ValueError:  # the box is optional: an unreadable json entry costs the box, not the sample
            return None
        box = box_from_json(meta.get("bbox") if isinstance(meta, dict) else None)  # (4,) or None
        if box is None:
            return None
        return scale_box(box, *decoded_scale(image_size(data), (image.shape[-1], image.shape[-2])))  # (4,)

    def _decode(self, sample: dict) -> tuple[torch.Tensor, int, str, Optional[torch.Tensor], bool]:
        """(3, H, W) uint8 image, label, key, (4,) box or None, and whether the label is a pseudo-label."""
        image_keys = [k for k in sample if k in IMAGE_EXTENSIONS]
        if len(image_keys) != 1:
            raise ValueError(f"{sample.get('__url__')}: {sample.get('__key__')}: expected one image, got {sorted(sample)}")
        data = sample[image_keys[0]]
        image = decode_image_tensor(data, self.min_side)  # (3, H, W) uint8
        image, box = self.transform.augment_with_box(image, self._decoded_box(sample, data, image))  # (3, H', W')
        if box is not None:
            box = scale_box(box, 1 / image.shape[-1], 1 / image.shape[-2])  # (4,) normalised to the output image
        return image, self._label(sample), sample["__key__"], box, PSEUDO_LABEL_KEY in sample

    def _batches(self, counter: SkipCounter, pseudo: Optional[PseudoLabelFilter], quota: Optional[int]
                 ) -> Callable[[Iterator], Iterator[dict]]:
        def stage(samples: Iterator[tuple[torch.Tensor, int, str, Optional[torch.Tensor], bool]]) -> Iterator[dict]:
            made, buffer = 0, []
            for sample in samples:
                if quota is not None and made >= quota:
                    break
                buffer.append(sample)
                if len(buffer) == self.batch_size:
                    yield self._collate(buffer, counter, pseudo)
                    made, buffer = made + 1, []
            if quota is not None and made >= quota:
                buffer = []
            if buffer and not self.drop_last:
                yield self._collate(buffer, counter, pseudo)
            elif counter.count or (pseudo is not None and pseudo.left_out):
                count, reasons = counter.take()
                yield {"skipped": count, "skip_reasons": reasons, "pseudo_left_out": pseudo.take() if pseudo else 0}
        return stage

    def _collate(self, buffer: list, counter: SkipCounter, pseudo: Optional[PseudoLabelFilter]) -> dict:
        images, labels, keys, boxes, pseudo_flags = zip(*buffer)
        has_box = torch.tensor([box is not None for box in boxes], dtype=torch.bool)  # (B,)
        box_rows = torch.zeros((len(boxes), 4), dtype=torch.float32)  # (B, 4) zeros where there is no box
        for row, box in zip(box_rows, boxes):
            if box is not None:
                row.copy_(box)
        out = torch.empty((len(images), *images[0].shape), dtype=torch.float32)  # (B, 3, H, W)
        if get_worker_info() is not None:  # the batch goes to the main process: build it in shared memory
            out.share_memory_()
        count, reasons = counter.take()
        return {
            "images": self.transform.collate(list(images), out),  # (B, 3, H, W)
            "labels": torch.tensor(labels, dtype=torch.long),  # (B,)
            "keys": list(keys),
            "boxes": box_rows,  # (B, 4) xyxy in [0, 1]
            "has_box": has_box,  # (B,)
            "pseudo": torch.tensor(pseudo_flags, dtype=torch.bool),  # (B,) trains with a pseudo-label
            "skipped": count,
            "skip_reasons": reasons,
            "pseudo_left_out": pseudo.take() if pseudo is not None else 0,  # below data.pseudo_min_score
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
        pseudo = PseudoLabelFilter(self.pseudo_min_score, self._dataset_labels, handler) if self.labelled else None
        pipeline = wds.DataPipeline(
            lambda: self._shard_urls(worker, num_workers, epoch),
            functools.partial(tar_samples, handler=handler),
            pseudo,  # before re-balancing, which counts a kept sample under its pseudo-label
            self._rebalance(balance_offsets(self.epoch_seed, epoch, self.rank, worker, len(self.factors)), handler)
            if self.factors is not None else None,
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=random.Random(seed))
            if self.shuffle and self.shuffle_buffer > 1 else None,
            wds.map(self._decode, handler=handler),
            self._batches(counter, pseudo, quota),
        )
        return iter(pipeline)
