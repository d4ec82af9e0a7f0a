"""What the run tells a person: ``metrics.jsonl`` events, per-rank epoch lines, the stage JSON and
a progress bar on rank 0.

Windows of training steps are averaged over steps and ranks (as data parallelism averages a
loss) before they are written; every rank takes part in those reductions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mgmoe_ds.metrics import MetricsLogger
from mgmoe_ds.model import HEAD_LAYER

LOG = logging.getLogger("mgmoe")
LOAD_IMBALANCE_WARNING = 2.0  # warn when the busiest expert gets this many times the mean load


class Window:
    """Running sums of the steps between two ``train`` lines."""

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
        # backbone MoE block -> (3, E): load, dropped, and steps each expert was out of the gate (the
        # hard constraint's mask, the same on every rank: its share is agreed over the group)
        self.block_load: dict[str, torch.Tensor] = {}
        self.block_steps: dict[str, int] = {}  # backbone MoE block -> steps with tokens on this rank

    def add(self, result: Any) -> None:
        for name, value in result.losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + float(value)
        self.steps += 1
        self.images += result.images
        self.seconds += result.seconds
        self.load += result.out.route.load_per_expert.float().cpu()
        self.dropped += result.out.route.dropped_per_expert.float().cpu()
        for name, route in result.out.routes.items():
            if name != HEAD_LAYER:
                has_tokens = route.logits.shape[0] > 0
                masked = torch.isneginf(route.logits).all(dim=0) & has_tokens  # (E,) out for every token
                counts = torch.stack([route.load_per_expert, route.dropped_per_expert, masked]).float().cpu()  # (3, E)
                self.block_load[name] = self.block_load[name] + counts if name in self.block_load else counts
                self.block_steps[name] = self.block_steps.get(name, 0) + int(has_tokens)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class StageClock:
    """How long the stage will take, from its own measured step and validation times.

    The first step is not timed (engine start, first batch); after ``measure`` timed steps it says
    the step time and the stage's end once; at each epoch end it says the epoch's wall time, the
    validation pass's, and the end again, with validations still to come counted in.

    Args:
        name: the stage's name.
        total_steps: steps in the stage.
        done_steps: steps already trained (a resumed stage).
        steps_per_epoch: planned steps per epoch (one validation pass each).
        measure: timed steps before the first estimate.
        clock: the time source (seconds); ``time.monotonic``.
        wall: the wall clock for the "ends at" time; ``time.time``.
    """

    def __init__(self, name: str, total_steps: int, done_steps: int, steps_per_epoch: int, measure: int = 10,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.name, self.total, self.done, self.per_epoch = name, total_steps, done_steps, max(1, steps_per_epoch)
        self.measure = max(1, min(measure, total_steps - done_steps - 1))
        self.clock, self.wall = clock, wall
        self.timed_from: Optional[float] = None
        self.timed_steps = 0
        self.step_seconds: Optional[float] = None
        self.val_seconds = 0.0
        self.epoch_started = clock()
        self.val_started: Optional[float] = None

    def _remaining(self) -> float:
        left = self.total - self.done
        validations = math.ceil(left / self.per_epoch)
        return left * (self.step_seconds or 0.0) + validations * self.val_seconds

    def _ends(self) -> str:
        remaining = self._remaining()
        ends = time.strftime("%H:%M", time.localtime(self.wall() + remaining))
        return f"about {_minutes(remaining)} left ({self.total - self.done} steps), ends ~{ends}"

    def step(self) -> Optional[str]:
        """Counts a step; the line to show once the step time is measured, else None."""
        self.done += 1
        if self.timed_from is None:
            self.timed_from = self.clock()
            return None
        self.timed_steps += 1
        if self.step_seconds is None and self.timed_steps >= self.measure:
            self.step_seconds = (self.clock() - self.timed_from) / self.timed_steps
            return f"stage {self.name}: {self.step_seconds:.2f} s/step measured; {self._ends()}"
        return None

    def validation_starts(self) -> None:
        self.val_started = self.clock()

    def epoch_ends(self, epoch: int) -> str:
        """Called after the epoch's validation pass; the line to show."""
        now = self.clock()
        if self.val_started is not None:
            self.val_seconds = now - self.val_started
        if self.step_seconds is None and self.timed_from is not None and self.timed_steps:
            self.step_seconds = (now - self.val_seconds - self.timed_from) / self.timed_steps
        took, self.epoch_started, self.val_started = now - self.epoch_started, now, None
        line = f"stage {self.name}: epoch {epoch} took {_minutes(took)} (validation {_minutes(self.val_seconds)})"
        return line + ("; stage done" if self.done >= self.total else f"; {self._ends()}")


class Telemetry:
    """The run's reporting.

    Args:
        run_dir: the run folder.
        comm: the run's ``Collectives``.
        num_experts: E (the expert load and drop vectors).
    """

    def __init__(self, run_dir: Path, comm: Any, num_experts: int) -> None:
        self.run_dir, self.comm = run_dir, comm
        self.is_main = comm.rank == 0
        self.logger = MetricsLogger(run_dir, enabled=self.is_main)
        self.window = Window(num_experts)
        self.stage_load = torch.zeros(num_experts)  # this rank's routing choices in the stage, by expert
        self.stage_dropped = torch.zeros(num_experts)  # ... and those dropped for capacity
        self.bar = None
        self.clock: Optional[StageClock] = None
        self.redirect = None  # tqdm's logging redirection while the bar is open

    # -- steps -----------------------------------------------------------------------------------

    def tick(self) -> None:
        """A step was taken (finite or not): the stage clock's count, and its estimate once measured."""
        line = self.clock.step() if self.clock is not None else None
        if line and self.is_main:
            LOG.info(line)

    def step(self, result: Any) -> None:
        self.window.add(result)
        self.stage_load += result.out.route.load_per_expert.float().cpu()
        self.stage_dropped += result.out.route.dropped_per_expert.float().cpu()
        if self.bar is not None:
            self.bar.update(1)

    def log_window(self, stage_name: str, epoch: int, step: int, lr_groups: list[dict[str, Any]],
                   warn_imbalance: bool) -> None:
        """The ``train`` event: the window's losses averaged over steps and ranks, lr per group, samples/s, load."""
        window = self.window
        # An expert's loss under expert parallelism is summed on the rank that holds it and divided
        # by all ranks here, as data parallelism averages it.
        names = self.comm.union(window.loss_sums)
        sums = self.comm.sum(torch.tensor([window.loss_sums.get(n, 0.0) for n in names], dtype=torch.float64))
        losses = dict(zip(names, (sums / (self.comm.world_size * max(1, window.steps))).tolist()))
        load, dropped = self.comm.sum(window.load), self.comm.sum(window.dropped)
        images = self.comm.reduce_int(window.images, "sum")
        blocks = {}
        for name in sorted(window.block_load):  # the same blocks on every rank: each ran every step
            block_load, block_dropped = self.comm.sum(window.block_load[name][:2])  # (E,), (E,)
            masked = window.block_load[name][2]  # (E,), this rank's
            blocks[name] = {"expert_load": (block_load / block_load.sum().clamp_min(1)).tolist(),
                            "dropped_fraction": float(block_dropped.sum() / block_load.sum().clamp_min(1)),
                            "masked_steps": (masked / max(1, window.block_steps[name])).tolist()}
        self.logger.log({
            "event": "train", "stage": stage_name, "epoch": epoch, "step": step, "losses": losses,
            "lr": {g.get("mgmoe_group", g.get("name")): g["lr"] for g in lr_groups},
            "samples_per_s": images / max(window.seconds, 1e-9) if window.seconds else 0.0,
            "expert_load": (load / load.sum().clamp_min(1)).tolist(),
            "dropped": int(dropped.sum()), "dropped_per_expert": dropped.long().tolist(),
            "dropped_fraction": float(dropped.sum() / load.sum().clamp_min(1)),
            **({"backbone_moe": blocks} if blocks else {}),
        })
        mean = load.sum() / max(1, load.numel())
        if warn_imbalance and mean > 0 and float(load.max() / mean) > LOAD_IMBALANCE_WARNING and self.is_main:
            LOG.warning("expert load imbalance at step %d: loads %s (busiest %.1fx the mean)", step,
                        load.long().tolist(), float(load.max() / mean))
        window.reset()

    def non_finite(self, step: int, losses: dict[str, Any], in_a_row: int) -> None:
        self.logger.log({"event": "non_finite_loss", "step": step, "losses": {k: float(v) for k, v in losses.items()}})
        LOG.warning("non-finite loss at step %d: step skipped (%d in a row)", step, in_a_row)

    # -- epochs and stages -----------------------------------------------------------------------

    def log_epoch(self, stage_name: str, epoch: int, step: int, batches: Any, planned: int, skipped: int) -> None:
        """Every rank says how many batches it trained on, of how many it planned, and why the epoch
        ended; rank 0 writes the table of all ranks (an ``epoch`` event)."""
        why = "it ran out of batches" if batches.ran_out else "the epoch ended on every rank"
        LOG.info("rank %d: stage %s epoch %d: trained on %d batch(es) of %d planned (%s); %d sample(s) skipped",
                 self.comm.rank, stage_name, epoch, batches.steps, planned, why, skipped)
        table = self.comm.per_rank([planned, int(batches.ran_out), skipped])  # (P, 3)
        self.logger.log({"event": "epoch", "stage": stage_name, "epoch": epoch, "step": step,
                         "batches": batches.steps, "planned_batches_per_rank": table[:, 0].long().tolist(),
                         "ran_out_per_rank": table[:, 1].bool().tolist(),
                         "skipped_per_rank": table[:, 2].long().tolist()})

    def start_stage(self) -> None:
        self.stage_load.zero_()
        self.stage_dropped.zero_()

    def stage_routing(self) -> dict[str, Any]:
        """The stage's routing choices and how many capacity dropped (since the stage started or resumed),
        over every rank (a collective)."""
        load, dropped = self.comm.sum(self.stage_load), self.comm.sum(self.stage_dropped)
        return {"choices": int(load.sum()), "dropped": int(dropped.sum()),
                "dropped_fraction": float(dropped.sum() / load.sum().clamp_min(1)),
                "dropped_per_expert": dropped.long().tolist()}

    def validation_starts(self) -> None:
        if self.clock is not None:
            self.clock.validation_starts()

    def log_validation(self, stage_name: str, epoch: int, step: int, val: dict[str, float]) -> None:
        boxes = {f"val_{k}": val[k] for k in ("mean_iou", "iou50") if k in val}  # with a box tower
        self.logger.log({"event": "validation", "stage": stage_name, "epoch": epoch, "step": step,
                         "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"], **boxes})
        if self.clock is not None and self.is_main:
            box_words = f", box mean IoU {val['mean_iou']:.3f}" if "mean_iou" in val and val.get("box_images") else ""
            LOG.info("%s; val top-1 %.3f%s", self.clock.epoch_ends(epoch), val["top1"], box_words)
        if self.bar is not None:
            self.bar.set_postfix(val_top1=f"{val['top1']:.3f}")

    def write_stage_json(self, index: int, record: dict[str, Any]) -> None:
        if self.is_main:
            (self.run_dir / "stages" / f"{index}_{record['stage']}.json").write_text(json.dumps(record, indent=2))

    def open_bar(self, stage_name: str, total: int, initial: int, steps_per_epoch: int) -> None:
        """The stage's progress bar (rank 0) and its clock (every rank: it only counts)."""
        self.clock = StageClock(stage_name, total, initial, steps_per_epoch)
        if self.is_main:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, desc=stage_name, dynamic_ncols=True, leave=True)
            # log lines while the bar is open go through tqdm.write: each on its own line, the bar redrawn below
            self.redirect = logging_redirect_tqdm()
            self.redirect.__enter__()

    def close_bar(self) -> None:
        self.clock = None
        if self.redirect is not None:
            self.redirect.__exit__(None, None, None)
            self.redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log(self, record: dict[str, Any]) -> None:
        self.logger.log(record)

    def close(self) -> None:
        self.close_bar()
        self.logger.close()


def final_summary(run_dir: Path, summary: dict[str, Any], test: Optional[dict[str, float]],
                  checkpoint_tag: Optional[str]) -> str:
    """Writes ``final_metrics.json``; returns the closing lines: the accuracies, where the run's
    files are, and the next commands with this run's own paths."""
    (run_dir / "final_metrics.json").write_text(json.dumps(summary, indent=2))
    model = run_dir / "model.safetensors"
    return "\n".join([
        f"done: validation top-1 {summary['val']['top1']:.3f}, top-5 {summary['val']['top5']:.3f}"
        + (f"; test top-1 {test['top1']:.3f}" if test else ""),
        *(["  test top-1 by training frequency: " + ", ".join(
            f"{name} {b['top1']:.3f} ({b['classes']} species)" for name, b in test["buckets"].items()
            if b["top1"] is not None)] if test and test.get("buckets") else []),
        f"  run folder   {run_dir}",
        f"  metrics      {run_dir / 'metrics.jsonl'} (every step window and validation), "
        f"{run_dir / 'final_metrics.json'}, {run_dir / 'stages'}/ (one JSON per stage)",
        f"  checkpoints  {run_dir / 'checkpoints'} (last good: {checkpoint_tag or 'none'}; continue with --resume {run_dir})",
        "next:",
        f"  mgmoe eval --checkpoint {run_dir} --out {run_dir / 'eval'}      # report, per-expert table, figures",
        f"  mgmoe ablate --checkpoint {run_dir} --out {run_dir / 'ablation'}  # routing vs fixed expert subsets",
        f"  mgmoe export --checkpoint {run_dir} --out {model}    # one file for inference",
        f"  mgmoe predict --model {model} PHOTO_OR_FOLDER ...",
    ])
