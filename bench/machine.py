"""What the benchmarks record about the machine they ran on (imported by the bench scripts)."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` says, else "?"."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return platform.processor() or "?"
