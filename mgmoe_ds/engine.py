"""The training job on DeepSpeed: distributed set-up, the curriculum's stages, checkpoints, logging.

One DeepSpeed engine per stage (each stage trains different parameter groups, so it gets its own
ZeRO optimizer; the previous engine's hooks are removed with ``engine.destroy()``). Checkpoints
are DeepSpeed's (one file per global expert); the run folder's ``checkpoints/last_good.json`` is
replaced atomically only after every rank finished a save, so a crash during a save never
points a resume at a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mgmoe_ds.config import RunConfig, config_to_dict, load_run_config
from mgmoe_ds.curriculum import (
    StagePlan,
    allowed_from_clusters,
    assign_clusters,
    cluster_expert_count,
    cluster_expert_scores,
    cluster_teacher,
    kmeans,
    plan_stage,
    teacher_kl,
    top_experts_per_cluster,
)
from mgmoe_ds.metrics import MetricsLogger, topk_correct
from mgmoe_ds.train.distributed import (
    Collectives,
    adjust_precision,
    check_expert_parallel_size,
    fixed_order_loss,
    launched_world_size,
    reduces_in_arrival_order,
    setup_distributed,
)

LOG = logging.getLogger("mgmoe")
DEMO_ROOT = Path(__file__).resolve().parent.parent / "shards"
DEMO_NAME = "demo_birds"
LOAD_IMBALANCE_WARNING = 2.0  # warn when the busiest expert gets this many times the mean load


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and where the last good checkpoint is."""


# ---------------------------------------------------------------------------------------------
# Run state


@dataclass
class ClusterState:
    """Cluster-level routing state: centroids, per-cluster teacher, and each cluster's top experts."""

    centroids: torch.Tensor  # (C, D)
    teacher: torch.Tensor  # (C, E)
    scores: torch.Tensor  # (C, E) mean log-likelihood per expert on each cluster's validation images
    val_counts: torch.Tensor  # (C,)
    train_counts: torch.Tensor  # (C,)

    def to_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in vars(self).items()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "ClusterState":
        return cls(**state)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_clusters": int(self.centroids.shape[0]),
            "train_images_per_cluster": self.train_counts.long().tolist(),
            "val_images_per_cluster": self.val_counts.long().tolist(),
            "expert_scores_mean_loglik": [[round(float(x), 4) for x in row] for row in self.scores],
            "teacher": [[round(float(x), 4) for x in row] for row in self.teacher],
            "top2_experts": top_experts_per_cluster(self.teacher, 2).tolist(),
        }


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    stage_index: int = 0
    stage_step: int = 0  # optimizer steps done in this stage
    epoch: int = 0  # epoch within the stage
    step_in_epoch: int = 0
    global_step: int = 0
    bad_steps: int = 0  # consecutive non-finite losses
    clusters: Optional[ClusterState] = None

    def to_state(self) -> dict[str, Any]:
        state = {k: v for k, v in vars(self).items() if k != "clusters"}
        state["clusters"] = None if self.clusters is None else self.clusters.to_state()
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Progress":
        clusters = state.get("clusters")
        return cls(**{k: v for k, v in state.items() if k != "clusters"},
                   clusters=None if clusters is None else ClusterState.from_state(clusters))


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python's, NumPy's and torch's generators, and the GPU's on a CUDA device (dropout there draws from it)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    python = state["python"]
    random.setstate((python[-2], tuple(python[:-2]), python[-1]))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainArgs:
    deepspeed_config: Path
    data: Optional[str] = None
    output: Optional[Path] = None
    resume: Optional[Path] = None
    overrides: list[str] = field(default_factory=list)
    max_steps: Optional[int] = None  # stop (after a checkpoint) once this many steps ran; for tests


def resolve_dataset(config: RunConfig, data_arg: Optional[str], comm: Collectives) -> str:
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


class Trainer:
    """Runs the configured curriculum on DeepSpeed; see the module docstring."""

    def __init__(self, args: TrainArgs) -> None:
        self.args = args
        self.config, ds_config = load_run_config(args.deepspeed_config, args.overrides)
        # Before any process group: a launch the config cannot use fails on every rank in one line.
        check_expert_parallel_size(self.config.moe.expert_parallel_size, self.config.num_experts,
                                   launched_world_size(), str(args.deepspeed_config))
        self.dist = setup_distributed()
        self.comm = Collectives(self.dist.device)
        self.ds_config = adjust_precision(ds_config, self.dist.rank)
        # DeepSpeed casts the model for bf16/fp16 but not its inputs.
        self.input_dtype = (torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else
                            torch.float16 if self.ds_config.get("fp16", {}).get("enabled") else torch.float32)
        self.is_main = self.dist.rank == 0
        zero_stage = int((self.ds_config.get("zero_optimization") or {}).get("stage", 0))
        if (self.is_main and zero_stage == 0 and self.config.moe.expert_parallel_size > 1
                and float(self.ds_config.get("gradient_clipping", 0) or 0) > 0):
            LOG.warning("ZeRO stage 0 with expert_parallel_size > 1: DeepSpeed clips by the mean of each rank's "
                        "local gradient norm, not the global norm, so training differs from data parallelism; "
                        "use ZeRO-1 or ZeRO-2 (ds_configs/zero1.json, zero2.json)")
        if args.resume is not None:
            self.run_dir = Path(args.resume)
        else:
            self.run_dir = Path(args.output or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_main:
            (self.run_dir / "stages").mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.comm.barrier()
        self.dataset = resolve_dataset(self.config, args.data, self.comm)
        self.micro_batch = int(self.ds_config.get("train_micro_batch_size_per_gpu", 32))
        self.base_lr = float(self.ds_config.get("optimizer", {}).get("params", {}).get("lr", 1e-3))
        seed_everything(self.config.train.seed)
        self._read_label_space()
        self._build_model()
        self._build_data()
        self._cache_store = None  # FeatureCacheStore, made by the first stage that trains from cached features
        self._augmented_loader = None  # train-transform loader without shuffling, for cache.views > 1
        self._stage_cache_record: Optional[dict[str, Any]] = None  # the current stage's cache, for its JSON
        # What this stage's backbone weights determine; cleared when the weights may change.
        self._eval_caches: dict[str, Any] = {}  # split -> eval-transform FeatureCache
        self._backbone_digest: Optional[str] = None  # feature_cache.weights_digest of the backbone
        seed_everything(self.config.train.seed + 1000 * self.dist.rank)
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main)
        if self.is_main:
            resolved = {"mgmoe": config_to_dict(self.config), "deepspeed": self.ds_config,
                        "dataset": self.dataset, "world_size": self.dist.world_size,
                        "num_classes": self.num_classes}
            (self.run_dir / "config.json").write_text(json.dumps(resolved, indent=2))

    # -- construction ---------------------------------------------------------------------------

    def _loader(self, split: str, train: bool, shuffle: Optional[bool] = None):
        from mgmoe_ds.data import make_loader

        data = self.config.data
        return make_loader(self.dataset, split, batch_size=self.micro_batch, img_size=self.config.model.img_size,
                           train=train, rank=self.dist.rank, world_size=self.dist.world_size,
                           num_workers=data.num_workers, epoch_seed=self.config.train.seed,
                           resampled=data.resampled and train, balance=data.balance if train else None,
                           shuffle=shuffle, shuffle_buffer=data.shuffle_buffer,
                           pin_memory=self.dist.device.type == "cuda", persistent_workers=data.persistent_workers,
                           transform_options=self.model.backbone.preprocessing())

    def _read_label_space(self) -> None:
        from mgmoe_ds.data import resolve_source

        _, classes, counts = resolve_source(self.dataset, "train")
        self.num_classes = self.config.model.num_classes or len(classes)
        self.class_names = classes
        self.class_counts = counts
        if self.num_classes != len(classes):
            raise TrainingError(f"mgmoe.model.num_classes = {self.num_classes} but the dataset {self.dataset} "
                                f"has {len(classes)} classes")

    def _build_data(self) -> None:
        """Loaders with the backbone's own normalisation (e.g. mean = std = 0.5 for Lite0)."""
        self.train_loader, self.train_info = self._loader("train", train=True)
        self.train_features_loader, _ = self._loader("train", train=False, shuffle=False)
        self.val_loader, self.val_info = self._loader(self.config.data.val_split, train=False)
        # Loaders of the eval transform by split, for ``_eval_batches`` (the final test adds "test").
        self.eval_loaders = {"train": self.train_features_loader, self.config.data.val_split: self.val_loader}

    def _build_model(self) -> None:
        from mgmoe_ds.model import MGMoE
        from mgmoe_ds.moe.deepspeed_compat import adopt_moe_layers, expert_parallel_rank

        ep_size = self.config.moe.expert_parallel_size
        ep_rank = expert_parallel_rank(ep_size)
        self.model = MGMoE(self.config.model, self.config.moe, self.num_classes, expert_parallel_rank=ep_rank)
        adopt_moe_layers(self.model)
        self.model.to(self.dist.device)
        if self.is_main:
            names = ", ".join(f"{i}:{n}" for i, n in enumerate(self.model.expert_names))
            LOG.info("model: backbone %s, experts [%s], top-%d, expert_parallel_size %d",
                     self.config.model.backbone, names, self.config.moe.top_k, ep_size)

    def _engine_for(self, plan: StagePlan, total_steps: int):
        import deepspeed

        from mgmoe_ds.moe.deepspeed_compat import moe_param_groups

        trained: list[dict[str, Any]] = []
        for name, params in self.model.parameter_groups().items():
            lr = plan.group_lr.get(name)
            for p in params:
                p.requires_grad_(lr is not None)
            if lr is not None and params:
                group = {"name": name, "params": params, "lr": lr}
                if plan.frozen_routing and name == "expert_heads":
                    group["weight_decay"] = 0.0  # a masked (zero-gradient) head must not move at all
                trained.append(group)
        if not trained:
            raise TrainingError(f"stage {plan.name!r} trains no parameters; check curriculum.stages lr")
        self._mask_frozen_heads(plan)
        warmup = max(1, min(100, total_steps // 10))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

        engine, *_ = deepspeed.initialize(
            model=self.model, model_parameters=moe_param_groups(trained), config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self._ordered_params = None
        if reduces_in_arrival_order(self.ds_config):
            # Expert parameters first and the parameters every rank holds last: their gradients
            # then arrive first, in the same order on every rank (see fixed_order_loss).
            expert_ids = {id(p) for p in self.model.moe.expert_parameters()}
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            self._ordered_params = ([p for p in trainable if id(p) in expert_ids]
                                    + [p for p in trainable if id(p) not in expert_ids])
        return engine, trained

    @staticmethod
    def _loss_scale(engine) -> float:
        """The fp16 loss scale DeepSpeed applies in ``backward`` (1 in fp32 and bf16)."""
        return float(getattr(engine.optimizer, "loss_scale", 1.0)) if engine.fp16_enabled() else 1.0

    def _mask_frozen_heads(self, plan: StagePlan) -> None:
        """Stage 2 trains only the heads of each cluster's top-2 experts.

        The other heads stay in the optimizer (so every rank keeps the same ZeRO group structure,
        even one whose experts are in no cluster's top-2) but their gradients are zeroed; with
        zero gradients and no weight decay AdamW leaves them exactly as they are.
        """
        for handle in getattr(self, "_head_masks", []):
            handle.remove()
        self._head_masks = []
        if not plan.frozen_routing or "expert_heads" not in plan.group_lr:
            return
        unfrozen = self._unfrozen_heads()
        for global_id, params in self.model.head_parameters_by_expert().items():
            if global_id not in unfrozen:
                self._head_masks += [p.register_hook(torch.zeros_like) for p in params]

    def _unfrozen_heads(self) -> set[int]:
        clusters = self.progress.clusters
        if clusters is None:
            return set()
        return set(top_experts_per_cluster(clusters.teacher, self._cluster_experts()).flatten().tolist())

    def _cluster_experts(self) -> int:
        return cluster_expert_count(self.config.moe.top_k, self.model.num_experts)

    # -- passes ----------------------------------------------------------------------------------

    def _train_mode(self, plan: StagePlan) -> None:
        """Training mode, except a frozen backbone: its BatchNorm statistics must not drift either
        (and it then computes exactly what the feature cache stores)."""
        self.model.train()
        if "backbone" not in plan.group_lr:
            self.model.backbone.eval()

    def _images(self, batch: dict) -> torch.Tensor:
        return batch["images"].to(self.dist.device, dtype=self.input_dtype, non_blocking=True)

    def _empty_batch(self) -> dict:
        size = self.config.model.img_size
        return {"images": torch.zeros(0, 3, size, size), "labels": torch.zeros(0, dtype=torch.long)}

    def _forward(self, batch: dict, targets: Optional[torch.Tensor] = None, *, module=None, **routing) -> Any:
        """``module`` (the model, or its DeepSpeed engine) on a batch of images or of cached
        features (``"features"``: the backbone is skipped)."""
        module = module or self.model
        if "features" in batch:
            features = {k: v.to(self.dist.device, dtype=self.input_dtype, non_blocking=True)
                        for k, v in batch["features"].items()}
            return module(None, targets, features=features, **routing)
        return module(self._images(batch), targets, **routing)

    def _eval_batches(self, split: str, plan: Optional[StagePlan]) -> Iterator[dict]:
        """``split`` through the eval transform, the same number of batches on every rank (a rank
        that runs out gets empty batches): cached backbone features while ``plan`` keeps the
        backbone frozen (see ``_eval_cache``), else images."""
        cache = self._eval_cache(split, plan)
        if cache is None:
            for batch in self.comm.agreed(self.eval_loaders[split], pad=True):
                yield batch or self._empty_batch()
            return
        from mgmoe_ds.feature_cache import batches_per_epoch

        n = cache.num_samples
        count = self.comm.reduce_int(batches_per_epoch(n, self.micro_batch), "max")
        for b in range(count):
            rows = torch.arange(min(b * self.micro_batch, n), min((b + 1) * self.micro_batch, n))  # (B,), empty past the end
            yield {"features": cache.gather(rows, torch.zeros_like(rows)), "labels": cache.labels[rows]}

    @torch.no_grad()
    def _pooled_features(self, plan: Optional[StagePlan]) -> torch.Tensor:
        self.model.eval()
        feats = []
        for batch in self._eval_batches("train", plan):
            pooled = (batch["features"]["pooled"] if "features" in batch
                      else self.model.forward_features(self._images(batch))["pooled"])
            feats.append(pooled.float().cpu())
        return torch.cat(feats) if feats else torch.zeros(0, self.model.backbone.info.pooled_dim)

    @torch.no_grad()
    def _val_expert_stats(self, plan: Optional[StagePlan]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per validation image: pooled features (N, D) and each expert's log p(true class) (N, E)."""
        self.model.eval()
        pooled, loglik = [], []
        for batch in self._eval_batches(self.config.data.val_split, plan):
            labels = batch["labels"].to(self.dist.device)
            out = self._forward(batch, mode="dense")
            per_expert = torch.zeros(labels.shape[0], self.model.num_experts, out.expert_logits.shape[-1],
                                     device=labels.device)  # (B, E, C)
            per_expert.scatter_(1, out.route.expert_indices[:, :, None].expand_as(out.expert_logits),
                                out.expert_logits.float())
            logp = torch.log_softmax(per_expert, dim=-1)  # (B, E, C)
            loglik.append(logp.gather(2, labels[:, None, None].expand(-1, self.model.num_experts, 1))[..., 0].cpu())
            pooled.append(out.pooled.float().cpu())
        return torch.cat(pooled), torch.cat(loglik)

    def _recompute_clusters(self, plan: Optional[StagePlan]) -> ClusterState:
        cur = self.config.curriculum
        train_pooled = self._pooled_features(plan)
        initial = torch.zeros(cur.num_clusters, train_pooled.shape[1])
        if self.is_main:
            g = torch.Generator().manual_seed(self.config.train.seed + self.progress.global_step)
            picks = torch.randperm(train_pooled.shape[0], generator=g)[:cur.num_clusters]
            initial = train_pooled[picks][torch.arange(cur.num_clusters) % max(1, len(picks))]
        initial = self.comm.broadcast_from_main(initial)
        centroids = kmeans(train_pooled, cur.num_clusters, all_reduce=self.comm.sum, initial=initial)
        train_counts = self.comm.sum(torch.bincount(assign_clusters(train_pooled, centroids),
                                                     minlength=cur.num_clusters).float())
        val_pooled, loglik = self._val_expert_stats(plan)
        scores, val_counts = cluster_expert_scores(loglik, assign_clusters(val_pooled, centroids), cur.num_clusters,
                                                   self.comm.sum)
        teacher = cluster_teacher(scores, cur.teacher_temperature)
        return ClusterState(centroids, teacher, scores, val_counts, train_counts)

    @torch.no_grad()
    def evaluate(self, split: str, routing: dict[str, Any], plan: Optional[StagePlan] = None) -> dict[str, float]:
        """Top-1/top-5/loss on ``split``; from the eval feature cache while ``plan`` keeps the backbone frozen."""
        self.model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # images, top1, top5, loss sum
        for batch in self._eval_batches(split, plan):
            labels = batch["labels"].to(self.dist.device)
            out = self._forward(batch, **routing)
            if labels.numel():
                top1, top5 = topk_correct(out.logits.float(), labels, (1, 5))
                loss = F.cross_entropy(out.logits.float(), labels, reduction="sum")
                totals += torch.tensor([labels.numel(), top1, top5, float(loss)], dtype=torch.float64)
        totals = self.comm.sum(totals)
        n = max(1.0, float(totals[0]))
        return {"images": int(totals[0]), "top1": float(totals[1]) / n, "top5": float(totals[2]) / n,
                "loss": float(totals[3]) / n}

    def _routing_kwargs(self, plan: StagePlan) -> dict[str, Any]:
        if plan.mode == "dense":
            return {"mode": "dense", "uniform_weights": plan.uniform_weights}
        clusters = self.progress.clusters
        if plan.frozen_routing and clusters is not None:
            cluster_experts = top_experts_per_cluster(clusters.teacher, self._cluster_experts())
            centroids = clusters.centroids.to(self.dist.device)

            def route_by(pooled: torch.Tensor) -> dict[str, Any]:
                assigned = assign_clusters(pooled, centroids)
                return {"allowed_experts": allowed_from_clusters(assigned, cluster_experts, self.model.num_experts),
                        "top_k": min(self.config.moe.top_k, cluster_experts.shape[1])}

            return {"mode": "topk", "route_by": route_by}
        return {"mode": "topk"}

    # -- feature cache (stages with a frozen backbone) --------------------------------------------

    def _cache_refusal(self, plan: StagePlan) -> Optional[str]:
        """Why this stage trains from images rather than from cached features; None: it can use the cache."""
        from mgmoe_ds.experts import expert_class

        if "backbone" in plan.group_lr:
            return "it trains the backbone"
        if self.config.cache.mode == "off":
            return "mgmoe.cache.mode is \"off\""
        if self.config.data.resampled or self.config.data.balance is not None:
            return "data.resampled / data.balance draw samples the cache's epochs do not reproduce"
        raw = [spec.name for spec in self.config.model.experts if expert_class(spec.name).needs_raw_images]
        if raw:
            return f"expert(s) {', '.join(raw)} need the raw image in training"
        return None

    def _feature_cache_store(self):
        from mgmoe_ds.feature_cache import FeatureCacheStore

        if self._cache_store is None:
            settings = self.config.cache
            shared = settings.dir is not None  # kept on disk for other runs: always memory-mapped
            self._cache_store = FeatureCacheStore(
                Path(settings.dir) if shared else self.run_dir / "feature_cache", dtype=settings.dtype,
                memory_limit_bytes=0 if shared else int(settings.memory_limit_gb * 2**30),
                progress=self.is_main, delete_replaced=not shared)
        return self._cache_store

    def _feature_cache_key(self, split: str, views: int) -> str:
        from mgmoe_ds.data.transforms import create_transform
        from mgmoe_ds.feature_cache import cache_key, manifest_bytes, weights_digest

        options = self.model.backbone.preprocessing()
        transform = repr(create_transform(self.config.model.img_size, views > 1, **options))
        if self._backbone_digest is None:
            self._backbone_digest = weights_digest(self.model.backbone)
        return cache_key(self._backbone_digest, transform=f"{transform}|input={self.input_dtype}",
                         manifest=manifest_bytes(self.dataset), split=split, features=self.model.features | {"pooled"},
                         rank=self.dist.rank, world_size=self.dist.world_size, views=views,
                         dtype=self.config.cache.dtype, seed=self.config.train.seed)

    def _compute_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_features(images.to(self.dist.device, dtype=self.input_dtype))

    def _stage_feature_cache(self, plan: StagePlan):
        """The feature cache this stage trains from (built, or reused from an earlier stage or an
        earlier run in this folder), or None with a logged reason when it trains from images."""
        from mgmoe_ds.feature_cache import describe

        refusal = self._cache_refusal(plan)
        self._stage_cache_record = None
        if refusal is not None:
            if self.is_main and "backbone" not in plan.group_lr:
                LOG.info("stage %s: backbone frozen but no feature cache: %s", plan.name, refusal)
            return None
        views = self.config.cache.views
        key = self._feature_cache_key("train", views)
        capacity = self.train_info.samples_per_rank[self.dist.rank]
        started = time.perf_counter()
        self.model.eval()  # the cached features are the frozen backbone's inference outputs
        cache, reused = self._feature_cache_store().get(key, views=views, capacity=capacity,
                                                        view_batches=self._cache_view_batches,
                                                        compute=self._compute_features, slot="train",
                                                        description="feature cache (train)")
        self.model.train()
        self._stage_cache_record = {"key": key, "storage": cache.storage, "views": cache.num_views,
                                    "dtype": cache.dtype, "samples": cache.num_samples, "reused": reused}
        if self.is_main:
            LOG.info("stage %s: training from the feature cache %s (%s; %s in %.1fs)", plan.name, key[:12],
                     describe(cache), "reused" if reused else "built", time.perf_counter() - started)
            self._log_cached_experts()
        return cache

    def _eval_cache(self, split: str, plan: Optional[StagePlan]):
        """Eval-transform features of ``split`` (``"train"`` or the validation split) from the frozen
        backbone, built once and read by every validation pass and cluster recomputation of the
        stages that keep the backbone frozen; None (images are used) when ``plan`` trains the
        backbone, caching is off, or ``split`` is another split (the final test reads images).

        With ``cache.views == 1`` the training split's eval cache is the training cache itself.
        """
        if (plan is None or "backbone" in plan.group_lr or self.config.cache.mode == "off"
                or split not in ("train", self.config.data.val_split)):
            return None
        if split not in self._eval_caches:
            from mgmoe_ds.feature_cache import describe

            info = self.train_info if split == "train" else self.val_info
            started = time.perf_counter()
            was_training = self.model.training
            self.model.eval()
            key, capacity = self._feature_cache_key(split, 1), info.samples_per_rank[self.dist.rank]
            if capacity == 0:  # this rank holds none of the split's shards: an empty cache of the right shapes
                cache, reused = self._empty_feature_cache(key), False
            else:
                cache, reused = self._feature_cache_store().get(
                    key, views=1, capacity=capacity, view_batches=partial(self._in_fixed_order, self.eval_loaders[split]),
                    compute=self._compute_features,
                    slot=f"eval:{split}", description=f"feature cache ({split})")
            self.model.train(was_training)
            if self.is_main:
                LOG.info("%s passes of stage %s read the feature cache %s (%s; %s in %.1fs)", split, plan.name,
                         cache.key[:12], describe(cache), "reused" if reused else "built",
                         time.perf_counter() - started)
            self._eval_caches[split] = cache
        return self._eval_caches[split]

    def _forget_backbone_state(self) -> None:
        """Drops what was derived from the backbone's weights (they changed, or may have)."""
        self._eval_caches.clear()
        self._backbone_digest = None

    @torch.no_grad()
    def _empty_feature_cache(self, key: str):
        from mgmoe_ds.feature_cache import CACHE_DTYPES, FeatureCache

        size, dtype = self.config.model.img_size, self.config.cache.dtype
        features = self._compute_features(torch.zeros(0, 3, size, size))  # zero-row features of the right shapes
        return FeatureCache(key, {k: v[None].to("cpu", CACHE_DTYPES[dtype]) for k, v in features.items()},
                            torch.zeros(0, dtype=torch.long), dtype)

    def _log_cached_experts(self) -> None:
        from mgmoe_ds.experts import expert_class

        for spec in self.config.model.experts:
            note = expert_class(spec.name).cached_training_note
            if note:
                LOG.info("feature cache: expert %s: %s", spec.name, note)

    def _cache_view_batches(self, view: int) -> Iterator[dict]:
        """This rank's training samples in a fixed order: view 0 of ``cache.views == 1`` through the
        eval transform, else view ``view`` through the training transform (augmentation seeded by it)."""
        if self.config.cache.views == 1:
            yield from self._in_fixed_order(self.train_features_loader)
            return
        if self._augmented_loader is None:
            self._augmented_loader, _ = self._loader("train", train=True, shuffle=False)
        self._augmented_loader.set_epoch(view)
        with torch.random.fork_rng(devices=[]):  # in-process workers draw from the global generator
            torch.manual_seed(self.config.train.seed * 1_000_003 + view)
            yield from self._augmented_loader

    @staticmethod
    def _in_fixed_order(loader, view: int = 0) -> Iterator[dict]:
        """An unshuffled eval-transform loader's batches, the same on every call (one cache view)."""
        loader.set_epoch(0)
        yield from loader

    def _cached_batches(self, cache, epoch: int, steps_per_epoch: int, start: int = 0) -> Iterator[dict]:
        """One epoch of cached batches ``{"features", "labels"}``; ``steps_per_epoch`` is already the
        minimum over ranks, so ranks step together."""
        for features, labels in cache.batches(self.micro_batch, steps_per_epoch, seed=self.config.train.seed,
                                              epoch=epoch, start=start):
            yield {"features": features, "labels": labels}

    # -- checkpoints -----------------------------------------------------------------------------

    def _save(self, engine, tag: str, stage_complete: bool) -> None:
        engine.save_checkpoint(str(self.ckpt_dir), tag=tag)
        folder = self.ckpt_dir / tag
        torch.save(rng_state(self.dist.device), folder / f"rng_rank{self.dist.rank}.pt")
        if self.is_main:
            torch.save(self.progress.to_state(), folder / "progress.pt")
        self.comm.barrier()
        if self.is_main:
            pointer = {"tag": tag, "stage_index": self.progress.stage_index, "stage_complete": stage_complete,
                       "global_step": self.progress.global_step, "world_size": self.dist.world_size}
            tmp = self.ckpt_dir / "last_good.json.tmp"
            tmp.write_text(json.dumps(pointer))
            os.replace(tmp, self.ckpt_dir / "last_good.json")
            self._prune_checkpoints(keep=tag)
        self.comm.barrier()

    def _prune_checkpoints(self, keep: str) -> None:
        """Keeps every stage-end checkpoint and the newest periodic one."""
        for folder in self.ckpt_dir.iterdir():
            if folder.is_dir() and folder.name != keep and "-step" in folder.name:
                shutil.rmtree(folder, ignore_errors=True)

    def _last_good(self) -> Optional[dict[str, Any]]:
        pointer = self.ckpt_dir / "last_good.json"
        return json.loads(pointer.read_text()) if pointer.is_file() else None

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        stages = self.config.curriculum.stages
        self.progress = Progress()
        resume = self._last_good() if self.args.resume is not None else None
        if self.args.resume is not None and resume is None:
            raise TrainingError(f"--resume {self.run_dir}: no checkpoints/last_good.json there")
        start = 0
        if resume is not None:
            start = resume["stage_index"] + (1 if resume["stage_complete"] else 0)
            if self.is_main:
                LOG.info("resuming from %s (stage %d, step %d)", resume["tag"], resume["stage_index"],
                         resume["global_step"])
        final: dict[str, Any] = {}
        for stage_index in range(start, len(stages)):
            final = self._run_stage(stage_index, resume if stage_index == start else None)
            if final.get("stopped"):
                return final
        test = self._final_test()
        summary = {"val": final.get("val"), "test": test, "global_step": self.progress.global_step}
        if self.is_main:
            (self.run_dir / "final_metrics.json").write_text(json.dumps(summary, indent=2))
            self.logger.log({"event": "final", **{f"test_{k}": v for k, v in (test or {}).items()}})
            LOG.info("done: validation top-1 %.3f, top-5 %.3f%s", summary["val"]["top1"], summary["val"]["top5"],
                     f"; test top-1 {test['top1']:.3f}" if test else "")
        self.logger.close()
        return summary

    def _final_test(self) -> Optional[dict[str, float]]:
        """Test metrics from images (never from the fp16 feature cache), or None without a test split."""
        try:
            self.eval_loaders["test"], _ = self._loader("test", train=False)
        except Exception:  # a dataset without a test split
            return None
        return self.evaluate("test", self._routing_kwargs(plan_stage(self.config.curriculum.stages[-1],
                                                                     self.base_lr)))

    def _stage_length(self, stage, stage_index: int, cached: bool = False) -> tuple[int, int]:
        """Planned batches per epoch (the smallest rank's, in the stage's first epoch) and steps in
        the stage; the plan sets the learning-rate schedule, so a resumed run must compute the same."""
        if cached:  # the manifest's count of this rank's samples, known before the cache is built
            from mgmoe_ds.feature_cache import batches_per_epoch

            local = batches_per_epoch(self.train_info.samples_per_rank[self.dist.rank], self.micro_batch)
        else:
            self.train_loader.set_epoch(1000 * stage_index)
            local = len(self.train_loader)
        steps_per_epoch = self.comm.reduce_int(local, "min")
        if steps_per_epoch == 0:
            raise TrainingError(f"dataset {self.dataset}: a rank has no training batch; use fewer ranks or a "
                                f"smaller train_micro_batch_size_per_gpu")
        total = stage.steps if stage.steps is not None else stage.epochs * steps_per_epoch
        return steps_per_epoch, total

    def _run_stage(self, stage_index: int, resume: Optional[dict[str, Any]]) -> dict[str, Any]:
        stage = self.config.curriculum.stages[stage_index]
        plan = plan_stage(stage, self.base_lr)
        self._forget_backbone_state()  # keyed by the weights this stage starts from
        pending_rng: Optional[dict[str, Any]] = None
        use_cache = self._cache_refusal(plan) is None
        steps_per_epoch, total_steps = self._stage_length(stage, stage_index, cached=use_cache)
        tag_prefix = f"stage{stage_index}-{stage.name}"
        carried_clusters = self.progress.clusters
        if resume is not None:
            # Progress (and clusters) come from the checkpoint; the engine needs them first for
            # stage 2's head selection, so read the client state before building the engine.
            state = torch.load(self.ckpt_dir / resume["tag"] / "progress.pt", map_location="cpu", weights_only=True)
            self.progress = Progress.from_state(state)
            pending_rng = torch.load(self.ckpt_dir / resume["tag"] / f"rng_rank{self.dist.rank}.pt",
                                     weights_only=True)
            if resume["stage_complete"]:
                # Stopped right after the previous stage's end checkpoint: this stage starts as the
                # uninterrupted run started it, generators included (it saved them at that point).
                self.progress = Progress(stage_index=stage_index, global_step=self.progress.global_step,
                                         clusters=self.progress.clusters)
                set_rng_state(pending_rng, self.dist.device)
                pending_rng = None
        else:
            self.progress = Progress(stage_index=stage_index, global_step=self.progress.global_step,
                                     clusters=carried_clusters)
        if plan.frozen_routing and self.progress.clusters is None:
            self.progress.clusters = self._recompute_clusters(plan)
        engine, trained = self._engine_for(plan, total_steps)
        if resume is not None:
            full = not resume["stage_complete"]
            engine.load_checkpoint(str(self.ckpt_dir), tag=resume["tag"], load_module_only=not full,
                                   load_optimizer_states=full, load_lr_scheduler_states=full)
            self._forget_backbone_state()  # the loaded weights may differ from those the clusters used
        cache = self._stage_feature_cache(plan)  # after the checkpoint load: keyed by the loaded weights
        self._write_stage_json(stage_index, plan, trained)
        if self.is_main:
            LOG.info("stage %d/%d %s: %d steps (%d per epoch), training %s", stage_index + 1,
                     len(self.config.curriculum.stages), stage.name, total_steps, steps_per_epoch,
                     ", ".join(f"{g['name']}@{g['lr']:.2g}" for g in trained))
        progress_bar = None
        if self.is_main:
            from tqdm.auto import tqdm

            progress_bar = tqdm(total=total_steps, initial=self.progress.stage_step, desc=stage.name,
                                dynamic_ncols=True, leave=True)
        window = _Window(self.model.num_experts)
        result: dict[str, Any] = {}

        def stage_done() -> bool:
            if stage.epochs is not None:
                return self.progress.epoch >= stage.epochs
            return self.progress.stage_step >= total_steps

        while not stage_done():
            if plan.uses_teacher and self.progress.step_in_epoch == 0:
                self.progress.clusters = self._recompute_clusters(plan)
                self._write_stage_json(stage_index, plan, trained)
            routing = self._routing_kwargs(plan)
            epoch_seed = 1000 * stage_index + self.progress.epoch
            self.train_loader.set_epoch(epoch_seed)
            self._train_mode(plan)
            # This epoch's batches, the same count on every rank (a vote per batch on batches that
            # exist), at most the smallest rank's planned count for this epoch (re-balancing makes
            # it change from epoch to epoch) and, in a stage measured in steps, the steps left.
            limit = steps_per_epoch if cache is not None else self.comm.reduce_int(len(self.train_loader), "min")
            if stage.steps is not None:
                limit = min(limit, self.progress.step_in_epoch + total_steps - self.progress.stage_step)
            if cache is not None:  # a cache starts anywhere: no replay
                start = self.progress.step_in_epoch
                source = self._cached_batches(cache, epoch_seed, steps_per_epoch, start=start)
                batches = self.comm.agreed(source, pad=False, limit=limit - start)
                replay = 0
            else:
                batches = self.comm.agreed(self.train_loader, pad=False, limit=limit)
                replay = self.progress.step_in_epoch
            iterator = iter(batches)
            for _ in range(replay):
                next(iterator, None)  # resuming inside an epoch: replay the data order past the trained batches
            if pending_rng is not None:
                # Restored only now, so the replay's augmentation draws do not shift the stream.
                set_rng_state(pending_rng, self.dist.device)
                pending_rng = None
            for batch in iterator:
                self._train_step(engine, plan, batch, routing, window)
                self.progress.step_in_epoch += 1
                self.progress.stage_step += 1
                self.progress.global_step += 1
                if progress_bar is not None:
                    progress_bar.update(1)
                if self.progress.global_step % self.config.train.log_every == 0:
                    self._log_window(engine, plan, window)
                every = self.config.train.checkpoint_every
                if every and self.progress.global_step % every == 0 and not stage_done():
                    self._save(engine, f"{tag_prefix}-step{self.progress.global_step}", stage_complete=False)
                if self.args.max_steps is not None and self.progress.global_step >= self.args.max_steps:
                    self._save(engine, f"{tag_prefix}-step{self.progress.global_step}", stage_complete=False)
                    if progress_bar is not None:
                        progress_bar.close()
                    engine.destroy()
                    return {"stopped": True, "global_step": self.progress.global_step}
            self._log_epoch(stage.name, batches, cache)
            if self.progress.step_in_epoch == 0:
                raise TrainingError(f"dataset {self.dataset}: stage {stage.name} epoch {self.progress.epoch}: a rank "
                                    f"had no training batch; see the per-rank lines above")
            self.progress.epoch += 1
            self.progress.step_in_epoch = 0
            val = self.evaluate(self.config.data.val_split, routing, plan)
            self._train_mode(plan)
            result = {"val": val}
            self.logger.log({"event": "validation", "stage": stage.name, "epoch": self.progress.epoch,
                             "step": self.progress.global_step, "val_top1": val["top1"], "val_top5": val["top5"],
                             "val_loss": val["loss"]})
            if progress_bar is not None:
                progress_bar.set_postfix(val_top1=f"{val['top1']:.3f}")
        if progress_bar is not None:
            progress_bar.close()
        self._save(engine, f"{tag_prefix}-end", stage_complete=True)
        engine.destroy()
        self._mask_frozen_heads(plan_stage(self.config.curriculum.stages[0], self.base_lr))  # removes the masks
        if "val" not in result:
            result = {"val": self.evaluate(self.config.data.val_split, self._routing_kwargs(plan), plan)}
        return result

    def _log_epoch(self, stage_name: str, batches, cache) -> None:
        """Every rank says how many batches it trained on, of how many it planned, and why the epoch
        ended; rank 0 writes the table of all ranks to ``metrics.jsonl``."""
        if cache is not None:  # planned from the manifest's count of this rank's samples
            from mgmoe_ds.feature_cache import batches_per_epoch

            planned = batches_per_epoch(self.train_info.samples_per_rank[self.dist.rank], self.micro_batch)
            skipped = 0
        else:
            planned, skipped = len(self.train_loader), self.train_loader.skipped
        why = "it ran out of batches" if batches.ran_out else "the epoch ended on every rank"
        LOG.info("rank %d: stage %s epoch %d: trained on %d batch(es) of %d planned (%s); %d sample(s) skipped",
                 self.dist.rank, stage_name, self.progress.epoch, batches.steps, planned, why, skipped)
        table = self.comm.per_rank([planned, int(batches.ran_out), skipped])  # (P, 3)
        self.logger.log({"event": "epoch", "stage": stage_name, "epoch": self.progress.epoch,
                         "step": self.progress.global_step, "batches": batches.steps,
                         "planned_batches_per_rank": table[:, 0].long().tolist(),
                         "ran_out_per_rank": table[:, 1].bool().tolist(),
                         "skipped_per_rank": table[:, 2].long().tolist()})

    def _loss_weights(self, plan: StagePlan, stage_weights: dict[str, float]) -> dict[str, float]:
        moe = self.config.moe
        weights = {"task": 1.0, "fallback": 0.5, "moe.load_balance": moe.load_balance_weight,
                   "moe.z_loss": moe.z_loss_weight, "kl": self.config.curriculum.kl_weight if plan.uses_teacher else 0.0}
        if plan.mode == "dense":
            weights["moe.load_balance"] = weights["moe.z_loss"] = 0.0  # the router is not trained in warm-up
        weights.update(stage_weights)
        return weights

    def _train_step(self, engine, plan: StagePlan, batch: dict, routing: dict[str, Any], window: "_Window") -> None:
        labels = batch["labels"].to(self.dist.device, non_blocking=True)
        started = time.perf_counter()
        out = self._forward(batch, labels, module=engine, **routing)
        losses = dict(out.losses)
        if plan.uses_teacher and self.progress.clusters is not None:
            clusters = self.progress.clusters
            assigned = assign_clusters(out.pooled.detach(), clusters.centroids.to(out.pooled.device))
            losses["kl"] = teacher_kl(out.route.probs, clusters.teacher.to(out.pooled.device)[assigned])
        stage_cfg = self.config.curriculum.stages[self.progress.stage_index]
        weights = self._loss_weights(plan, stage_cfg.loss_weights)
        total = sum(weights.get(name, 1.0) * value for name, value in losses.items())
        finite = self.comm.reduce_int(int(bool(torch.isfinite(total))), "min")
        if not finite:
            self.progress.bad_steps += 1
            self.logger.log({"event": "non_finite_loss", "step": self.progress.global_step,
                             "losses": {k: float(v) for k, v in losses.items()}})
            LOG.warning("non-finite loss at step %d: step skipped (%d in a row)", self.progress.global_step,
                        self.progress.bad_steps)
            if self.progress.bad_steps >= self.config.train.max_bad_steps:
                last = self._last_good()
                raise TrainingError(f"{self.progress.bad_steps} non-finite losses in a row at step "
                                    f"{self.progress.global_step}; stopped. Last good checkpoint: "
                                    f"{self.ckpt_dir / last['tag'] if last else 'none yet'}")
            return
        self.progress.bad_steps = 0
        if self._ordered_params is not None:
            total = fixed_order_loss(total, self._ordered_params, self._loss_scale(engine))
        engine.backward(total)
        engine.step()
        window.add(losses, out, labels.shape[0], time.perf_counter() - started)

    def _log_window(self, engine, plan: StagePlan, window: "_Window") -> None:
        load = self.comm.sum(window.load)
        dropped = self.comm.sum(window.dropped)
        images = self.comm.reduce_int(window.images, "sum")
        # Each loss averaged over steps and ranks, as data parallelism averages it (an expert's loss
        # under expert parallelism is summed on the rank that holds it, then divided by all ranks).
        names = self.comm.union(window.loss_sums)
        sums = self.comm.sum(torch.tensor([window.loss_sums.get(n, 0.0) for n in names], dtype=torch.float64))
        losses = dict(zip(names, (sums / (self.dist.world_size * max(1, window.steps))).tolist()))
        record = {
            "event": "train", "stage": plan.name, "epoch": self.progress.epoch, "step": self.progress.global_step,
            "losses": losses,
            "lr": {g.get("mgmoe_group", g["name"]): g["lr"] for g in engine.optimizer.param_groups},
            "samples_per_s": images / max(window.seconds, 1e-9) if window.seconds else 0.0,
            "expert_load": (load / load.sum().clamp_min(1)).tolist(),
            "dropped": int(dropped.sum()), "dropped_per_expert": dropped.long().tolist(),
        }
        self.logger.log(record)
        mean = load.sum() / max(1, load.numel())
        if plan.mode == "topk" and mean > 0 and float(load.max() / mean) > LOAD_IMBALANCE_WARNING and self.is_main:
            LOG.warning("expert load imbalance at step %d: loads %s (busiest %.1fx the mean)",
                        self.progress.global_step, load.long().tolist(), float(load.max() / mean))
        window.reset()

    def _write_stage_json(self, stage_index: int, plan: StagePlan, trained: list[dict[str, Any]]) -> None:
        if not self.is_main:
            return
        stage = self.config.curriculum.stages[stage_index]
        record = {
            "stage": stage.name, "index": stage_index, "mode": plan.mode, "uniform_weights": plan.uniform_weights,
            "trained_groups": {g["name"]: g["lr"] for g in trained},
            "experts": self.model.expert_names,
            "clusters": None if self.progress.clusters is None else self.progress.clusters.to_json(),
            "feature_cache": self._stage_cache_record,
            "epoch": self.progress.epoch, "global_step": self.progress.global_step,
        }
        if plan.frozen_routing:
            record["unfrozen_heads"] = {str(e): self.model.expert_names[e] for e in sorted(self._unfrozen_heads())}
        path = self.run_dir / "stages" / f"{stage_index}_{stage.name}.json"
        path.write_text(json.dumps(record, indent=2))


class _Window:
    """Running sums between two log lines."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.loss_sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0
        self.seconds = 0.0
        self.load = torch.zeros(self.num_experts)
        self.dropped = torch.zeros(self.num_experts)

    def add(self, losses: dict[str, torch.Tensor], out, images: int, seconds: float) -> None:
        for name, value in losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + float(value.detach())
        self.steps += 1
        self.images += images
        self.seconds += seconds
        self.load += out.route.load_per_expert.float().cpu()
        self.dropped += out.route.dropped_per_expert.float().cpu()



def train(args: TrainArgs) -> dict[str, Any]:
    """Entry point of ``jobs/train.py``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return Trainer(args).run()
