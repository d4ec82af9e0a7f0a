"""What the run tells a person: ``metrics.jsonl`` events, per-rank epoch lines, the stage JSON and
a progress bar on rank 0.

Windows of training steps are averaged over steps and ranks (as data parallelism averages a
loss) before they are written; every rank takes part in those reductions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from mgmoe_ds.metrics import MetricsLogger

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

    def add(self, result: Any) -> None:
        for name, value in result.losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + float(value)
        self.steps += 1
        self.images += result.images
        self.seconds += result.seconds
        self.load += result.out.route.load_per_expert.float().cpu()
        self.dropped += result.out.route.dropped_per_expert.float().cpu()


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

    # -- steps -----------------------------------------------------------------------------------

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
        self.logger.log({
            "event": "train", "stage": stage_name, "epoch": epoch, "step": step, "losses": losses,
            "lr": {g.get("mgmoe_group", g.get("name")): g["lr"] for g in lr_groups},
            "samples_per_s": images / max(window.seconds, 1e-9) if window.seconds else 0.0,
            "expert_load": (load / load.sum().clamp_min(1)).tolist(),
            "dropped": int(dropped.sum()), "dropped_per_expert": dropped.long().tolist(),
            "dropped_fraction": float(dropped.sum() / load.sum().clamp_min(1)),
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

    def log_validation(self, stage_name: str, epoch: int, step: int, val: dict[str, float]) -> None:
        self.logger.log({"event": "validation", "stage": stage_name, "epoch": epoch, "step": step,
                         "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]})
        if self.bar is not None:
            self.bar.set_postfix(val_top1=f"{val['top1']:.3f}")

    def write_stage_json(self, index: int, record: dict[str, Any]) -> None:
        if self.is_main:
            (self.run_dir / "stages" / f"{index}_{record['stage']}.json").write_text(json.dumps(record, indent=2))

    def open_bar(self, stage_name: str, total: int, initial: int) -> None:
        if self.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=stage_name, dynamic_ncols=True, leave=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log(self, record: dict[str, Any]) -> None:
        self.logger.log(record)

    def close(self) -> None:
        self.close_bar()
        self.logger.close()


def final_summary(run_dir: Path, summary: dict[str, Any], test: Optional[dict[str, float]]) -> str:
    """Writes ``final_metrics.json``; returns the closing log line."""
    (run_dir / "final_metrics.json").write_text(json.dumps(summary, indent=2))
    return (f"done: validation top-1 {summary['val']['top1']:.3f}, top-5 {summary['val']['top5']:.3f}"
            + (f"; test top-1 {test['top1']:.3f}" if test else ""))
