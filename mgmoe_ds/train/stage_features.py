"""Which features a stage trains and evaluates from: images, or the frozen backbone's cached features.

A stage that does not train the backbone (below the cut of ``cache.depth``, if set) trains from a
feature cache (``mgmoe_ds.feature_cache``) built once per backbone state, and its validation,
cluster and teacher passes read eval-transform caches of the training and validation splits.
Everything here is keyed by the backbone weights the stage starts from; :meth:`StageFeatures.forget`
drops it when they may have changed.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from mgmoe_ds.config import RunConfig
from mgmoe_ds.train.mixing import stage_mixes

LOG = logging.getLogger("mgmoe")


class StageFeatures:
    """The feature caches of one rank.

    Args:
        config: the run configuration.
        model: the ``MGMoE`` (its backbone computes what is cached).
        data: the run's ``RunData``.
        run_dir: the run folder (its ``feature_cache/`` holds memory-mapped caches).
        device: the rank's device.
        input_dtype: the dtype images enter the backbone in.
        is_main: rank 0 (logs and progress bars).
    """

    def __init__(self, config: RunConfig, model: Any, data: Any, run_dir: Path, *, device: torch.device,
                 input_dtype: torch.dtype, is_main: bool) -> None:
        self.config, self.model, self.data, self.run_dir = config, model, data, run_dir
        self.device, self.input_dtype, self.is_main = device, input_dtype, is_main
        self._store = None  # FeatureCacheStore, made by the first stage that trains from cached features
        self.record: Optional[dict[str, Any]] = None  # the current stage's training cache, for its JSON
        # What this stage's backbone weights determine; cleared when the weights may change.
        self._eval_caches: dict[str, Any] = {}  # split -> eval-transform FeatureCache
        self._digest: Optional[str] = None  # feature_cache.weights_digest of the backbone
        self._content: Optional[bytes] = None  # the dataset's manifests, which the cache keys hash

    def refusal(self, stage: Any) -> Optional[str]:
        """Why ``stage`` trains from images rather than cached features; None: it can use the cache."""
        from mgmoe_ds.experts import expert_class

        if stage.trains_backbone:
            return "it trains the backbone"
        if self.config.cache.mode == "off":
            return "mgmoe.cache.mode is \"off\""
        if self._cache_exchanges_experts():
            return ("the backbone's MoE layers are expert-parallel and below the cache's output: computing its "
                    "features needs every rank in step (set cache.depth below the MoE blocks to cache under them)")
        if "box_tower" in stage.group_lr:
            return "it trains the box tower, whose boxes move with each augmented image (the cache stores none)"
        if self.config.data.resampled or self.config.data.balance is not None:
            return "data.resampled / data.balance draw samples the cache's epochs do not reproduce"
        if stage_mixes(self.config, stage.config):
            return "data.mixup / data.cutmix mix the training images of its epochs (the cache stores features)"
        if self.config.data.pseudo_weight != 1.0:
            return "data.pseudo_weight weighs pseudo-labelled images, which the cache does not mark"
        raw = [spec.name for spec in self.config.model.experts if expert_class(spec.name).needs_raw_images]
        if raw:
            return f"expert(s) {', '.join(raw)} need the raw image in training"
        return None

    def forget(self) -> None:
        """Drops what was derived from the backbone's weights (they changed, or may have)."""
        self._eval_caches.clear()
        self._digest = None

    # -- the training cache ----------------------------------------------------------------------

    def train_cache(self, stage: Any):
        """The feature cache ``stage`` trains from (built, or reused from an earlier stage or an
        earlier run), or None with a logged reason when it trains from images."""
        from mgmoe_ds.feature_cache import describe

        refusal = self.refusal(stage)
        self.record = None
        if refusal is not None:
            if self.is_main and not stage.trains_backbone:
                LOG.info("stage %s: backbone frozen but no feature cache: %s", stage.name, refusal)
            return None
        views = self.config.cache.views
        key = self._key("train", views)
        started = time.perf_counter()
        self.model.eval()  # the cached features are the frozen backbone's inference outputs
        cache, reused = self._cache_store().get(key, views=views, capacity=self.data.samples_per_rank("train"),
                                                view_batches=self._view_batches, compute=self._compute,
                                                slot="train", description="feature cache (train)")
        self.model.train()
        self.record = {"key": key, "storage": cache.storage, "views": cache.num_views, "dtype": cache.dtype,
                       "samples": cache.num_samples, "reused": reused, "depth": self.config.cache.depth}
        if self.is_main:
            depth = self.config.cache.depth
            LOG.info("stage %s: training from the feature cache %s (%s; %s in %.1fs)%s", stage.name, key[:12],
                     describe(cache), "reused" if reused else "built", time.perf_counter() - started,
                     "" if depth is None else f", the backbone's blocks after {depth} run on it each step")
            self._log_cached_experts()
        return cache

    def cached_batches(self, cache, epoch: int, num_batches: int, start: int = 0) -> Iterator[dict]:
        """One epoch of cached batches ``{"features", "labels", "keys", "views"}`` in an order seeded
        by ``epoch`` (``keys``: the samples' keys; ``views``: (B,) the view of each)."""
        for rows, views in cache.epoch_rows(self.data.micro_batch, num_batches, seed=self.config.train.seed,
                                            epoch=epoch, start=start):
            yield {"features": cache.gather(rows, views), "labels": cache.labels[rows],
                   "keys": [cache.keys[row] for row in rows.tolist()], "views": views}

    # -- the eval caches ---------------------------------------------------------------------------

    def eval_cache(self, split: str, stage: Any):
        """Eval-transform features of ``split`` (``"train"`` or the validation split) from the frozen
        backbone, built once and read by every validation pass and cluster recomputation of the
        stages that keep the backbone frozen; None (images are used) when ``stage`` trains the
        backbone, caching is off, or ``split`` is another split (the final test reads images).

        With ``cache.views == 1`` the training split's eval cache is the training cache itself.
        """
        if (stage is None or stage.trains_backbone or self.config.cache.mode == "off"
                or split not in ("train", self.data.val_split) or self._cache_exchanges_experts()):
            return None
        if split not in self._eval_caches:
            from mgmoe_ds.feature_cache import describe

            started = time.perf_counter()
            was_training = self.model.training
            self.model.eval()
            key, capacity = self._key(split, 1), self.data.samples_per_rank(split)
            if capacity == 0:  # this rank holds none of the split's shards: an empty cache of the right shapes
                cache, reused = self._empty_cache(key), False
            else:
                cache, reused = self._cache_store().get(
                    key, views=1, capacity=capacity,
                    view_batches=partial(fixed_order, self.data.eval_loaders[split]),
                    compute=self._compute, slot=f"eval:{split}", description=f"feature cache ({split})")
            self.model.train(was_training)
            if self.is_main:
                LOG.info("%s passes of stage %s read the feature cache %s (%s; %s in %.1fs)", split, stage.name,
                         cache.key[:12], describe(cache), "reused" if reused else "built",
                         time.perf_counter() - started)
            self._eval_caches[split] = cache
        return self._eval_caches[split]

    # -- internals -------------------------------------------------------------------------------

    def _cache_exchanges_experts(self) -> bool:
        """Whether computing what the cache holds runs an expert-parallel exchange: each rank builds
        its caches alone, so the other ranks would not be there to answer."""
        below_cut = self.config.cache.depth is None  # MoE blocks always sit above a cut
        return below_cut and any(layer.routed.ep_size > 1 for layer in self.model.token_moe_layers().values())

    def _cache_store(self):
        from mgmoe_ds.feature_cache import FeatureCacheStore

        if self._store is None:
            settings = self.config.cache
            shared = settings.dir is not None  # kept on disk for other runs: always memory-mapped
            self._store = FeatureCacheStore(
                Path(settings.dir) if shared else self.run_dir / "feature_cache", dtype=settings.dtype,
                memory_limit_bytes=0 if shared else int(settings.memory_limit_gb * 2**30),
                progress=self.is_main, delete_replaced=not shared)
        return self._store

    def _key(self, split: str, views: int) -> str:
        from mgmoe_ds.data import dataset_source
        from mgmoe_ds.data.transforms import create_transform
        from mgmoe_ds.feature_cache import cache_key, weights_digest

        options = self.model.backbone.preprocessing()
        transform = repr(create_transform(self.config.model.img_size, views > 1, **options))
        if self._digest is None:  # at a cut, only the lower part's weights: training the top keeps the cache
            self._digest = weights_digest(self.model.backbone.lower_modules())
        if self._content is None:
            self._content = dataset_source(self.data.dataset).content_bytes()
        return cache_key(self._digest, transform=f"{transform}|input={self.input_dtype}",
                         manifest=self._content, split=split,
                         features=self.model.cached_feature_names, rank=self.data.rank,
                         world_size=self.data.world_size, views=views, dtype=self.config.cache.dtype,
                         seed=self.config.train.seed, depth=self.config.cache.depth)

    def _compute(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.cache_features(images.to(self.device, dtype=self.input_dtype))

    @torch.no_grad()
    def _empty_cache(self, key: str):
        from mgmoe_ds.feature_cache import CACHE_DTYPES, FeatureCache

        size, dtype = self.config.model.img_size, self.config.cache.dtype
        features = self._compute(torch.zeros(0, 3, size, size))  # zero-row features of the right shapes
        return FeatureCache(key, {k: v[None].to("cpu", CACHE_DTYPES[dtype]) for k, v in features.items()},
                            torch.zeros(0, dtype=torch.long), dtype)

    def _log_cached_experts(self) -> None:
        from mgmoe_ds.experts import expert_class

        for spec in self.config.model.experts:
            note = expert_class(spec.name).cached_training_note
            if note:
                LOG.info("feature cache: expert %s: %s", spec.name, note)

    def _view_batches(self, view: int) -> Iterator[dict]:
        """This rank's training samples in a fixed order: view 0 of ``cache.views == 1`` through the
        eval transform, else view ``view`` through the training transform (augmentation seeded by it)."""
        if self.config.cache.views == 1:
            yield from fixed_order(self.data.train_features_loader)
            return
        yield from augmented_view(self.data.augmented_loader(), view, self.config.train.seed)


def augmented_view(loader, view: int, seed: int) -> Iterator[dict]:
    """View ``view`` of an unshuffled training-transform loader: its augmentation seeded by ``seed``
    and ``view``, so every caller (the feature cache, a teacher's predictions) gets the same crops."""
    loader.set_epoch(view)
    with torch.random.fork_rng(devices=[]):  # in-process workers draw from the global generator
        torch.manual_seed(seed * 1_000_003 + view)
        yield from loader


def fixed_order(loader, view: int = 0) -> Iterator[dict]:
    """An unshuffled eval-transform loader's batches, the same on every call (one cache view)."""
    loader.set_epoch(0)
    yield from loader
