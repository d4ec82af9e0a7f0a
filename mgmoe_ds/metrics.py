"""Metrics: top-k correctness and the run's metrics.jsonl (plus TensorBoard when installed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of images whose label is among the top-k logits, for each k (k capped at classes)."""
    if labels.numel() == 0:
        return [0 for _ in ks]
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices  # (B, kmax)
    hits = top == labels[:, None]  # (B, kmax)
    return [int(hits[:, :k].any(dim=-1).sum()) for k in ks]


class MetricsLogger:
    """Appends one JSON line per event to ``run_dir/metrics.jsonl``; mirrors scalars to TensorBoard.

    Args:
        run_dir: the run folder.
        enabled: False on every rank but rank 0 (then every call is a no-op).
    """

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        if self.writer is not None and "step" in record:
            for name, value in _flatten(record).items():
                if isinstance(value, (int, float)) and name not in ("step", "time", "epoch"):
                    self.writer.add_scalar(f"{record.get('event', 'event')}/{name}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            flat.update({f"{name}/{i}": v for i, v in enumerate(value)})
        else:
            flat[name] = value
    return flat
