"""The run's data: the dataset folder, its label space and this rank's loaders of each split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from mgmoe_ds.config import RunConfig

LOG = logging.getLogger("mgmoe")
DEMO_ROOT = Path(__file__).resolve().parent.parent.parent / "shards"
DEMO_NAME = "demo_birds"


def resolve_dataset(config: RunConfig, data_arg: Optional[str], comm: Any) -> str:
    """The dataset folder or "registry"; the demo birds are generated on first use (by rank 0)."""
    source = data_arg or config.data.dataset
    if source:
        return source
    demo = DEMO_ROOT / DEMO_NAME
    if not (demo / "manifest.json").is_file():
        if comm.rank == 0:
            from mgmoe_ds.data import build_demo

            LOG.info("no dataset given: generating the demo birds in %s", demo)
            build_demo(DEMO_ROOT, name=DEMO_NAME)
        comm.barrier()
    return str(demo)


class RunData:
    """Loaders of one rank, with the backbone's own normalisation (e.g. mean = std = 0.5 for Lite0).

    Args:
        config: the run configuration.
        dataset: a dataset folder or "registry".
        rank, world_size: this rank's share of every split's shards.
        micro_batch: images per batch.
        pin_memory: pin batches (GPU training).
        transform_options: the backbone's preprocessing (``Backbone.preprocessing()``).
    """

    def __init__(self, config: RunConfig, dataset: str, *, rank: int, world_size: int, micro_batch: int,
                 pin_memory: bool, transform_options: dict[str, Any]) -> None:
        from mgmoe_ds.data import DataError, dataset_source, resolve_source

        self.config, self.dataset, self.rank, self.world_size = config, dataset, rank, world_size
        self.micro_batch, self.pin_memory, self.transform_options = micro_batch, pin_memory, transform_options
        _, self.class_names, self.class_counts = resolve_source(dataset, "train")
        self.train_loader, self.train_info = self.loader("train", train=True)
        self.train_features_loader, _ = self.loader("train", train=False, shuffle=False)
        self.val_split = config.data.val_split
        if self.val_split not in dataset_source(dataset).splits():
            raise DataError(f"{dataset}: no {self.val_split!r} split: the routing teacher and the cluster-level routing "
                            f"are fitted on it; rebuild the dataset with `mgmoe shards build` (it carves a validation "
                            f"split from train, --val-fraction 0.1) or set mgmoe.data.val_split")
        self.val_loader, self.val_info = self.loader(self.val_split, train=False)
        if config.model.tasks.bbox is not None:
            self._check_boxes(dataset_source(dataset))
        # Loaders of the eval transform by split (the final test adds "test").
        self.eval_loaders = {"train": self.train_features_loader, self.val_split: self.val_loader}
        self._augmented_loader = None  # train-transform loader without shuffling, for cache.views > 1

    def _check_boxes(self, source: Any) -> None:
        """The box task needs boxes in the training split and a training transform that moves them."""
        from mgmoe_ds.data import DataError

        if not self.train_loader.stream.transform.moves_boxes:
            steps = [type(step).__name__ for step in self.train_loader.stream.transform.timm_transform.transforms]
            raise DataError(f"mgmoe.model.tasks.bbox: the training transform's steps {steps} run on PIL images, "
                            f"which cannot move boxes; drop the step without a tensor kernel or the box task")
        counts = [part.manifest.get("boxes", {}).get("train", {}).get("with_box") for part in source.parts]
        if all(count == 0 for count in counts):  # a manifest written before box counts says None: not refused
            raise DataError(f"{self.dataset}: mgmoe.model.tasks.bbox is set but no training image has a box "
                            f"(manifest boxes.train.with_box = 0); build the shards from a source with boxes "
                            f"(CUB's bounding_boxes.txt, CSV x,y,w,h columns) or drop the box task")

    def loader(self, split: str, train: bool, shuffle: Optional[bool] = None):
        """``(ShardLoader, DataInfo)`` of ``split`` for this rank."""
        from mgmoe_ds.data import make_loader

        data = self.config.data
        return make_loader(self.dataset, split, batch_size=self.micro_batch, img_size=self.config.model.img_size,
                           train=train, rank=self.rank, world_size=self.world_size, num_workers=data.num_workers,
                           epoch_seed=self.config.train.seed, resampled=data.resampled and train,
                           balance=data.balance if train else None, shuffle=shuffle,
                           shuffle_buffer=data.shuffle_buffer, pin_memory=self.pin_memory,
                           persistent_workers=data.persistent_workers, transform_options=self.transform_options,
                           pseudo_min_score=data.pseudo_min_score if split == "train" else 0.0)

    def augmented_loader(self):
        """The training transform without shuffling (the augmented views of a feature cache)."""
        if self._augmented_loader is None:
            self._augmented_loader, _ = self.loader("train", train=True, shuffle=False)
        return self._augmented_loader

    def test_loader(self):
        """The test split's eval loader, or None when the dataset has no test split."""
        if "test" not in self.eval_loaders:
            try:
                self.eval_loaders["test"], _ = self.loader("test", train=False)
            except ValueError:  # DataError: no shards for split 'test'
                return None
        return self.eval_loaders["test"]

    def samples_per_rank(self, split: str) -> int:
        """This rank's samples of ``split`` by the manifest (train or the validation split)."""
        info = self.train_info if split == "train" else self.val_info
        return info.samples_per_rank[self.rank]
