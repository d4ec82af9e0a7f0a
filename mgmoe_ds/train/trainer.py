"""The training job: the curriculum's stages, one after another, on DeepSpeed.

One DeepSpeed engine per stage (each stage trains different parameter groups, so it gets its own
ZeRO optimizer; the previous engine's hooks are removed with ``engine.destroy()``). The parts,
one job each: ``distributed`` (set-up, collectives, the engine), ``state`` and ``checkpoints``
(what a resume restores), ``data`` (loaders), ``stage_features`` (feature caches), ``passes``
(validation, clusters, teacher), ``step`` (one update) and ``telemetry`` (what a person sees).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mgmoe_ds.config import config_to_dict, load_run_config
from mgmoe_ds.curriculum import ClusterState, Stage, create_stage
from mgmoe_ds.train.checkpoints import CheckpointStore
from mgmoe_ds.train.data import RunData, resolve_dataset
from mgmoe_ds.train.mixing import mixing_for_epoch
from mgmoe_ds.train.distributed import (
    Collectives,
    adjust_precision,
    build_engine,
    check_expert_parallel_size,
    fixed_order,
    gradient_order,
    launched_world_size,
    reduces_in_arrival_order,
    setup_distributed,
    teardown_distributed,
)
from mgmoe_ds.train.passes import TrainingPasses
from mgmoe_ds.train.stage_features import StageFeatures
from mgmoe_ds.train.state import Clusters, Generators, Progress, seed_everything
from mgmoe_ds.train.step import TrainStep, trained_groups
from mgmoe_ds.train.telemetry import Telemetry, final_summary

LOG = logging.getLogger("mgmoe")


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and where the last good checkpoint is."""


@dataclass
class TrainArgs:
    deepspeed_config: Path
    data: Optional[str] = None
    output: Optional[Path] = None
    resume: Optional[Path] = None
    overrides: list[str] = field(default_factory=list)
    max_steps: Optional[int] = None  # stop (after a checkpoint) once this many steps ran; for tests


class Trainer:
    """Runs the configured curriculum; see the module docstring."""

    def __init__(self, args: TrainArgs) -> None:
        from mgmoe_ds.data import dataset_source
        from mgmoe_ds.model import MGMoE
        from mgmoe_ds.moe.deepspeed_compat import adopt_moe_layers, expert_parallel_rank

        self.args = args
        self.config, ds_config = load_run_config(args.deepspeed_config, args.overrides)
        moe = self.config.moe
        # Before any process group: a launch the config cannot use fails on every rank in one line.
        check_expert_parallel_size(moe.expert_parallel_size, self.config.num_experts, launched_world_size(),
                                   str(args.deepspeed_config))
        self.dist = setup_distributed()
        self.comm = Collectives(self.dist.device)
        self.is_main = self.dist.rank == 0
        self.ds_config = adjust_precision(ds_config, self.dist.rank)
        self._warn_zero0_clipping()
        # DeepSpeed casts the model for bf16/fp16 but not its inputs.
        self.input_dtype = (torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else
                            torch.float16 if self.ds_config.get("fp16", {}).get("enabled") else torch.float32)
        self.run_dir = Path(args.resume or args.output or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if self.is_main:
            (self.run_dir / "stages").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.comm.barrier()
        self.dataset = resolve_dataset(self.config, args.data, self.comm)
        self.micro_batch = int(self.ds_config.get("train_micro_batch_size_per_gpu", 32))
        self.base_lr = float(self.ds_config.get("optimizer", {}).get("params", {}).get("lr", 1e-3))
        classes = dataset_source(self.dataset).classes
        self.num_classes = self.config.model.num_classes or len(classes)
        if self.num_classes != len(classes):
            raise TrainingError(f"mgmoe.model.num_classes = {self.num_classes} but the dataset {self.dataset} "
                                f"has {len(classes)} classes")
        seed_everything(self.config.train.seed)
        self.model = MGMoE(self.config.model, moe, self.num_classes,
                           expert_parallel_rank=expert_parallel_rank(moe.expert_parallel_size),
                           cut_after=self.config.cache.depth)
        if self.config.train.init_from is not None and args.resume is None:  # transfer: a trained model's weights
            from mgmoe_ds.train.transfer import load_initial_weights, write_record

            record = load_initial_weights(self.model, self.config.train.init_from, classes, self.config)
            if self.is_main:
                LOG.info(write_record(record, self.run_dir / "init_from.json"))
        adopt_moe_layers(self.model)
        self.model.to(self.dist.device)
        self.data = RunData(self.config, self.dataset, rank=self.dist.rank, world_size=self.dist.world_size,
                            micro_batch=self.micro_batch, pin_memory=self.dist.device.type == "cuda",
                            transform_options=self.model.backbone.preprocessing())
        self.features = StageFeatures(self.config, self.model, self.data, self.run_dir, device=self.dist.device,
                                      input_dtype=self.input_dtype, is_main=self.is_main)
        self.passes = TrainingPasses(self.config, self.model, self.data, self.features, self.comm,
                                     device=self.dist.device, input_dtype=self.input_dtype)
        self.distiller = None
        if self.config.distill is not None:  # the teacher's predictions are computed when the run starts
            from mgmoe_ds.train.distill import Distiller

            root = Path(self.config.cache.dir) if self.config.cache.dir is not None else self.run_dir / "feature_cache"
            self.distiller = Distiller(self.config, self.data, root, device=self.dist.device, is_main=self.is_main)
        seed_everything(self.config.train.seed + 1000 * self.dist.rank)
        self.telemetry = Telemetry(self.run_dir, self.comm, self.model.num_experts)
        self.progress, self._clusters = Progress(), Clusters()
        self.checkpoints = CheckpointStore(self.run_dir / "checkpoints", self.dist.rank, self.comm)
        self.checkpoints.register("progress", self.progress)
        self.checkpoints.register("clusters", self._clusters)
        self.checkpoints.register("rng", Generators(self.dist.device), per_rank=True)
        self._head_masks: list = []
        if self.is_main:
            names = ", ".join(f"{i}:{n}" for i, n in enumerate(self.model.expert_names))
            LOG.info("model: backbone %s, experts [%s], top-%d, expert_parallel_size %d", self.config.model.backbone,
                     names, moe.top_k, moe.expert_parallel_size)
            resolved = {"mgmoe": config_to_dict(self.config), "deepspeed": self.ds_config, "dataset": self.dataset,
                        "world_size": self.dist.world_size, "num_classes": self.num_classes,
                        "class_names": list(classes)}
            (self.run_dir / "config.json").write_text(json.dumps(resolved, indent=2))

    # -- the stage hooks' view of the run (curriculum.StageHooks) --------------------------------

    @property
    def clusters(self) -> Optional[ClusterState]:
        return self._clusters.value

    def recompute_clusters(self) -> None:
        clusters = self.passes.clusters(self.stage, seed=self.config.train.seed + self.progress.global_step)
        self._clusters.value = clusters
        self._write_stage_json()
        warning = clusters.left_out_warning(self.config.moe.top_k, self.model.expert_names, self.num_classes,
                                            self.config.curriculum.teacher_score)
        if warning and self.is_main:
            LOG.warning("stage %s: %s", self.stage.name, warning)

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        stages = [create_stage(s, self.config, self.base_lr) for s in self.config.curriculum.stages]
        resume = self.checkpoints.last_good() if self.args.resume is not None else None
        if self.args.resume is not None and resume is None:
            raise TrainingError(f"--resume {self.run_dir}: no checkpoints/last_good.json there")
        start = 0 if resume is None else resume["stage_index"] + int(resume["stage_complete"])
        if resume is not None and self.is_main:
            LOG.info("resuming from %s (stage %d, step %d)", resume["tag"], resume["stage_index"], resume["global_step"])
        if self.distiller is not None:
            with torch.random.fork_rng(devices=[]):  # the run's generators draw as they would without a teacher
                self.distiller.prepare(self.input_dtype)
        final: dict[str, Any] = {}
        for index in range(start, len(stages)):
            final = self.run_stage(index, stages[index], resume if index == start else None)
            if final.get("stopped"):
                return final
        test_loader = self.data.test_loader()
        test = (self.passes.evaluate("test", stages[-1].routing(self.clusters), class_counts=self.data.class_counts)
                if test_loader is not None else None)
        summary = {"val": final.get("val"), "test": test, "global_step": self.progress.global_step}
        if self.is_main:
            self.telemetry.log({"event": "final", **{f"test_{k}": v for k, v in (test or {}).items()}})
            last = self.checkpoints.last_good()
            LOG.info(final_summary(self.run_dir, summary, test, last["tag"] if last else None))
        self.telemetry.close()
        return summary

    def run_stage(self, index: int, stage: Stage, resume: Optional[dict[str, Any]]) -> dict[str, Any]:
        # set-up: the plan, the run state (fresh, or the checkpoint's), the stage's engine and features
        self.stage, self.stage_index, progress = stage, index, self.progress
        self.features.forget()  # keyed by the weights this stage starts from
        steps_per_epoch, total_steps = self.plan(stage, index, cached=self.features.refusal(stage) is None)
        pending_rng = self._enter_stage(index, resume)
        engine, step = self.engine_for(stage, total_steps)
        if resume is not None:
            complete = resume["stage_complete"]
            engine.load_checkpoint(str(self.checkpoints.dir), tag=resume["tag"], load_module_only=complete,
                                   load_optimizer_states=not complete, load_lr_scheduler_states=not complete)
            self.features.forget()  # the loaded weights may differ from those the clusters used
        if pending_rng is None:  # the stage starts now (a mid-stage checkpoint holds what its start made)
            stage.on_stage_start(self)
        if stage.uses_fusion:  # after any checkpoint load: on from here on, in every later checkpoint too
            self.model.fusion.activate()
        self._mask_heads(set(range(self.model.num_experts)) if self._inert_heads else
                         stage.frozen_heads(self.clusters, self.model.num_experts))
        cache = self.features.train_cache(stage)  # after the checkpoint load: keyed by the loaded weights
        self._write_stage_json()
        if self.is_main:
            LOG.info("stage %d/%d %s: %d steps (%d per epoch), training %s", index + 1,
                     len(self.config.curriculum.stages), stage.name, total_steps, steps_per_epoch,
                     ", ".join(f"{g}@{lr:.2g}" for g, lr in stage.group_lr.items()))
        self.telemetry.open_bar(stage.name, total_steps, progress.stage_step, steps_per_epoch)
        self.telemetry.start_stage()
        result: dict[str, Any] = {}
        tag = f"stage{index}-{stage.name}"
        while not self._done(stage, total_steps):
            # epoch start: the stage's hook (clusters), this epoch's routing and agreed batches
            if progress.step_in_epoch == 0:
                stage.on_epoch_start(self)
            step.routing = stage.routing(self.clusters)
            step.mixing = mixing_for_epoch(self.config, index, progress.epoch, self.num_classes)  # off: the last epochs
            batches, replay = self._epoch_batches(stage, cache, steps_per_epoch, total_steps)
            self._train_mode(stage)
            iterator = iter(batches)
            for _ in range(replay):
                next(iterator, None)  # resuming inside an epoch: replay the data order past the trained batches
            if pending_rng is not None:  # restored only now, so the replay's augmentation draws do not shift it
                self.checkpoints.restore_per_rank(pending_rng)
                pending_rng = None
            # forward, backward, update; then logging, checkpoints and the step limit
            for batch in iterator:
                self._after_step(step(engine, batch, self.clusters))
                if progress.global_step % self.config.train.log_every == 0:
                    self.telemetry.log_window(stage.name, progress.epoch, progress.global_step,
                                              engine.optimizer.param_groups, step.routing.mode == "topk")
                every = self.config.train.checkpoint_every
                if every and progress.global_step % every == 0 and not self._done(stage, total_steps):
                    self._save(engine, f"{tag}-step{progress.global_step}", complete=False)
                if self.args.max_steps is not None and progress.global_step >= self.args.max_steps:
                    self._save(engine, f"{tag}-step{progress.global_step}", complete=False)
                    self.telemetry.close_bar()
                    engine.destroy()
                    return {"stopped": True, "global_step": progress.global_step}
            # epoch end: every rank's batch count, then validation with the stage's routing
            self._log_epoch(stage, batches, cache)
            progress.end_epoch()
            self.telemetry.validation_starts()
            result = {"val": self.passes.evaluate(self.data.val_split, step.routing, stage)}
            self.telemetry.log_validation(stage.name, progress.epoch, progress.global_step, result["val"])
        # stage end: what routing dropped, the checkpoint, then the engine and the head masks go
        self.telemetry.close_bar()
        self._write_stage_json(**self.telemetry.stage_routing())
        self._save(engine, f"{tag}-end", complete=True)
        engine.destroy()
        self._mask_heads(set())
        return result or {"val": self.passes.evaluate(self.data.val_split, stage.routing(self.clusters), stage)}

    # -- the stage loop's parts -------------------------------------------------------------------

    def plan(self, stage: Stage, index: int, cached: bool) -> tuple[int, int]:
        """Planned batches per epoch (the smallest rank's, in the stage's first epoch) and steps in
        the stage; the plan sets the learning-rate schedule, so a resumed run must compute the same."""
        if cached:  # the manifest's count of this rank's samples, known before the cache is built
            from mgmoe_ds.feature_cache import batches_per_epoch

            local = batches_per_epoch(self.data.samples_per_rank("train"), self.micro_batch)
        else:
            self.data.train_loader.set_epoch(1000 * index)
            local = len(self.data.train_loader)
        steps_per_epoch = self.comm.reduce_int(local, "min")
        if steps_per_epoch == 0:
            raise TrainingError(f"dataset {self.dataset}: a rank has no training batch; use fewer ranks or a "
                                f"smaller train_micro_batch_size_per_gpu")
        steps = stage.config.steps if stage.config.steps is not None else stage.config.epochs * steps_per_epoch
        return steps_per_epoch, steps

    def _enter_stage(self, index: int, resume: Optional[dict[str, Any]]) -> Optional[str]:
        """Progress and clusters for the stage; the tag whose generators are restored after the replay, or None."""
        if resume is None:
            self.progress.start_stage(index)
            return None
        self.checkpoints.restore_shared(resume["tag"])
        if not resume["stage_complete"]:
            return resume["tag"]
        # Stopped right after the previous stage's end checkpoint: this stage starts as the
        # uninterrupted run started it, generators included (they were saved at that point).
        self.progress.start_stage(index)
        self.checkpoints.restore_per_rank(resume["tag"])
        return None

    def engine_for(self, stage: Stage, total_steps: int):
        """The stage's DeepSpeed engine over the groups it trains, and its step."""
        groups = trained_groups(self.model, stage)
        if not groups:
            raise TrainingError(f"stage {stage.name!r} trains no parameters; check curriculum.stages lr")
        groups += self._inert_expert_heads(groups)
        engine = build_engine(self.model, groups, self.ds_config, total_steps)
        reorder = None
        if reduces_in_arrival_order(self.ds_config):
            experts = [p for layer in self.model.moe_layers().values() for p in layer.expert_parameters()]
            reorder = fixed_order(engine, gradient_order(self.model, experts))
        step = TrainStep(stage, stage.routing(self.clusters), self.comm, self.dist.device, self.input_dtype,
                         self.config.moe, reorder, self.config.model.backbone_moe, self.config.model.tasks,
                         distiller=self.distiller, pseudo_weight=self.config.data.pseudo_weight)
        return engine, step

    def _inert_expert_heads(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """DeepSpeed's ZeRO-1/2 refuses a model with MoE layers whose optimizer holds no expert
        parameter (a stage that trains only the fusion head, say): the experts' heads then join it
        with lr 0, no weight decay and masked (zero) gradients, and keep their weights exactly, as
        the residual stage's frozen heads do. Returns that group, or none when an expert trains."""
        experts = {id(p) for layer in self.model.moe_layers().values() for p in layer.expert_parameters()}
        self._inert_heads = not any(id(p) in experts for group in groups for p in group["params"])
        if not self._inert_heads:
            return []
        heads = [p.requires_grad_(True) for params in self.model.head_parameters_by_expert().values() for p in params]
        return [{"name": "expert_heads", "params": heads, "lr": 0.0, "weight_decay": 0.0}]

    def _mask_heads(self, frozen: set[int]) -> None:
        """Zeroes the gradients of the frozen experts' heads (they stay in the optimizer, so every
        rank keeps the same ZeRO group structure); an empty set removes the masks."""
        for handle in self._head_masks:
            handle.remove()
        self._head_masks = [p.register_hook(torch.zeros_like) for expert, params
                            in self.model.head_parameters_by_expert().items() if expert in frozen for p in params]

    def _done(self, stage: Stage, total_steps: int) -> bool:
        if stage.config.epochs is not None:
            return self.progress.epoch >= stage.config.epochs
        return self.progress.stage_step >= total_steps

    def _epoch_batches(self, stage: Stage, cache: Any, steps_per_epoch: int, total_steps: int):
        """This epoch's batches, the same count on every rank (a vote per batch on batches that exist),
        at most the smallest rank's planned count for this epoch (re-balancing changes it from epoch to
        epoch) and, in a stage measured in steps, the steps left; and how many to replay on a resume."""
        progress = self.progress
        epoch_seed = 1000 * self.stage_index + progress.epoch
        self.data.train_loader.set_epoch(epoch_seed)
        limit = steps_per_epoch if cache is not None else self.comm.reduce_int(len(self.data.train_loader), "min")
        if stage.config.steps is not None:
            limit = min(limit, progress.step_in_epoch + total_steps - progress.stage_step)
        if cache is None:
            return self.comm.agreed(self.data.train_loader, pad=False, limit=limit), progress.step_in_epoch
        start = progress.step_in_epoch  # a cache starts anywhere: no replay
        source = self.features.cached_batches(cache, epoch_seed, steps_per_epoch, start=start)
        return self.comm.agreed(source, pad=False, limit=limit - start), 0

    def _train_mode(self, stage: Stage) -> None:
        """Training mode, except a frozen backbone: its BatchNorm statistics must not drift either
        (and it then computes exactly what the feature cache stores). Above a cut (``cache.depth``)
        the top's statistics stay frozen too while only ``backbone_top`` trains: the ImageNet
        statistics, not those of 32-image class-balanced batches on one rank, and training then
        computes the function that validation and inference compute. A stage that trains only the
        fusion head runs the whole model as evaluation does: it weighs the frozen experts' outputs
        without their dropout, as they come at inference. Backbone MoE blocks that train (above the
        cut) stay in training mode: their capacity, noise and hard constraint are training's."""
        self.model.train(set(stage.group_lr) != {"fusion"})
        if not stage.trains_backbone:
            self.model.backbone.eval()
            for layer in self.model.token_moe_layers().values():
                layer.train("backbone_moe" in stage.group_lr)

    def _after_step(self, result: Any) -> None:
        """Counts the step; a non-finite loss (skipped on every rank) counts towards the stop."""
        self.progress.count_step()
        self.telemetry.tick()
        if result.finite:
            self.progress.bad_steps = 0
            self.telemetry.step(result)
            return
        self.progress.bad_steps += 1
        self.telemetry.non_finite(self.progress.global_step, result.losses, self.progress.bad_steps)
        if self.progress.bad_steps >= self.config.train.max_bad_steps:
            last = self.checkpoints.last_good()
            raise TrainingError(f"{self.progress.bad_steps} non-finite losses in a row at step "
                                f"{self.progress.global_step}; stopped. Last good checkpoint: "
                                f"{self.checkpoints.dir / last['tag'] if last else 'none yet'}")

    def _log_epoch(self, stage: Stage, batches: Any, cache: Any) -> None:
        if cache is not None:  # planned from the manifest's count of this rank's samples
            from mgmoe_ds.feature_cache import batches_per_epoch

            planned, skipped = batches_per_epoch(self.data.samples_per_rank("train"), self.micro_batch), 0
        else:
            planned, skipped = len(self.data.train_loader), self.data.train_loader.skipped
        self.telemetry.log_epoch(stage.name, self.progress.epoch, self.progress.global_step, batches, planned, skipped)
        if batches.steps == 0:
            raise TrainingError(f"dataset {self.dataset}: stage {stage.name} epoch {self.progress.epoch}: a rank "
                                f"had no training batch; see the per-rank lines above")

    def _save(self, engine: Any, tag: str, complete: bool) -> None:
        self.checkpoints.save(engine, tag, stage_index=self.progress.stage_index, stage_complete=complete,
                              global_step=self.progress.global_step)

    def _write_stage_json(self, **extra: Any) -> None:
        record = {**self.stage.to_json(self.clusters), **extra, "index": self.stage_index,
                  "experts": self.model.expert_names,
                  "clusters": None if self.clusters is None else self.clusters.to_json(),
                  "feature_cache": self.features.record, "epoch": self.progress.epoch,
                  "global_step": self.progress.global_step}
        self.telemetry.write_stage_json(self.stage_index, record)

    def _warn_zero0_clipping(self) -> None:
        zero_stage = int((self.ds_config.get("zero_optimization") or {}).get("stage", 0))
        if (self.is_main and zero_stage == 0 and self.config.moe.expert_parallel_size > 1
                and float(self.ds_config.get("gradient_clipping", 0) or 0) > 0):
            LOG.warning("ZeRO stage 0 with expert_parallel_size > 1: DeepSpeed clips by the mean of each rank's "
                        "local gradient norm, not the global norm, so training differs from data parallelism; "
                        "use ZeRO-1 or ZeRO-2 (ds_configs/zero1.json, zero2.json)")


def train(args: TrainArgs) -> dict[str, Any]:
    """Entry point of ``jobs/train.py``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    trainer = Trainer(args)
    summary = trainer.run()
    teardown_distributed(trainer.comm)
    return summary
