"""What the benchmarks record about the machine they ran on (imported by the bench scripts)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` says, else "?"."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return platform.processor() or "?"


def machine_record() -> dict:
    """The machine, as the results JSON of a benchmark records it."""
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "loadavg": os.getloadavg()}


def command_line(script: str) -> str:
    """How this benchmark was started: ``PYTHONPATH=. python bench/<script>`` and its arguments."""
    import sys

    return f"PYTHONPATH=. python bench/{script}" + "".join(f" {a}" for a in sys.argv[1:])


def without_per_image(results: dict, *names: str) -> dict:
    """A copy of ``results`` without each arm's per-image ``test`` entries ``names`` (they stay in the
    work folder's predictions)."""
    saved = json.loads(json.dumps(results))
    for arm in saved["arms"].values():
        for name in names:
            arm["test"].pop(name)
    return saved


def write_results(results: dict, name: str) -> Path:
    """Writes ``results`` to ``bench/results/<name>.json`` and returns the path."""
    out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return out
