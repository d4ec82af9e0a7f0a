"""Checkpoints: DeepSpeed's files plus the run state, one schema, read by resume and by inference.

``RUN/checkpoints/<tag>/`` holds DeepSpeed's checkpoint (one file per global expert, loadable at
any expert-parallel size), ``run_state.pt`` (every registered shared object's ``state_dict``:
progress and cluster state) and ``<name>_rank<r>.pt`` for each per-rank object (the
generators). ``RUN/checkpoints/last_good.json`` is replaced atomically only after every rank
finished a save, so a crash during a save never points a resume at a half-written checkpoint.
Run folders written before ``run_state.pt`` (a ``progress.pt`` with flat progress fields) are
still read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

RUN_STATE = "run_state.pt"
LEGACY_RUN_STATE = "progress.pt"  # run folders of earlier versions
POINTER = "last_good.json"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def read_run_state(folder: Path) -> Optional[dict[str, Any]]:
    """A checkpoint folder's shared run state ``{"progress": {...}, "clusters": {...} or None}``,
    read as tensors only; None when the folder has none."""
    path = Path(folder) / RUN_STATE
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    legacy = Path(folder) / LEGACY_RUN_STATE
    if not legacy.is_file():
        return None
    flat = torch.load(legacy, map_location="cpu", weights_only=True)
    return {"progress": {k: v for k, v in flat.items() if k != "clusters"}, "clusters": flat.get("clusters")}


class CheckpointStore:
    """Saves and restores the run in ``checkpoints_dir``, as ``register``ed objects and a DeepSpeed engine.

    Args:
        checkpoints_dir: ``RUN/checkpoints``.
        rank: this process's rank; rank 0 writes the shared files.
        comm: the run's ``Collectives`` (barriers around the pointer update).
    """

    def __init__(self, checkpoints_dir: Path, rank: int, comm: Any) -> None:
        self.dir, self.rank, self.comm = Path(checkpoints_dir), rank, comm
        self.shared: dict[str, Stateful] = {}  # the same on every rank: written by rank 0
        self.per_rank: dict[str, Stateful] = {}  # one file per rank

    def register(self, name: str, obj: Stateful, *, per_rank: bool = False) -> None:
        (self.per_rank if per_rank else self.shared)[name] = obj

    def last_good(self) -> Optional[dict[str, Any]]:
        """The pointer ``{"tag", "stage_index", "stage_complete", "global_step", "world_size"}``, or None."""
        pointer = self.dir / POINTER
        return json.loads(pointer.read_text()) if pointer.is_file() else None

    def save(self, engine: Any, tag: str, *, stage_index: int, stage_complete: bool, global_step: int) -> None:
        """DeepSpeed's checkpoint, then every registered object, then (all ranks done) the pointer."""
        engine.save_checkpoint(str(self.dir), tag=tag)
        folder = self.dir / tag
        for name, obj in self.per_rank.items():
            torch.save(obj.state_dict(), folder / f"{name}_rank{self.rank}.pt")
        if self.rank == 0:
            torch.save({name: obj.state_dict() for name, obj in self.shared.items()}, folder / RUN_STATE)
        self.comm.barrier()
        if self.rank == 0:
            pointer = {"tag": tag, "stage_index": stage_index, "stage_complete": stage_complete,
                       "global_step": global_step, "world_size": self.comm.world_size}
            tmp = self.dir / (POINTER + ".tmp")
            tmp.write_text(json.dumps(pointer))
            os.replace(tmp, self.dir / POINTER)
            self._prune(keep=tag)
        self.comm.barrier()

    def restore_shared(self, tag: str) -> None:
        """Loads every registered shared object (progress, clusters) from ``tag``."""
        state = read_run_state(self.dir / tag) or {}
        for name, obj in self.shared.items():
            obj.load_state_dict(state.get(name))

    def restore_per_rank(self, tag: str) -> None:
        """Loads this rank's registered objects (the generators) from ``tag``."""
        for name, obj in self.per_rank.items():
            obj.load_state_dict(torch.load(self.dir / tag / f"{name}_rank{self.rank}.pt", weights_only=True))

    def _prune(self, keep: str) -> None:
        """Keeps every stage-end checkpoint and the newest periodic one."""
        for folder in self.dir.iterdir():
            if folder.is_dir() and folder.name != keep and "-step" in folder.name:
                shutil.rmtree(folder, ignore_errors=True)
