"""What a checkpoint restores besides weights and optimizer: progress, cluster state and generators.

Each piece has ``state_dict()`` / ``load_state_dict()`` (as Lightning's progress counters do), so
``train/checkpoints.py`` saves and restores a list of them without knowing what they are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np
import torch

from mgmoe_ds.curriculum import ClusterState


@dataclass
class Progress:
    """Where the run is."""

    stage_index: int = 0
    stage_step: int = 0  # optimizer steps done in this stage
    epoch: int = 0  # epoch within the stage
    step_in_epoch: int = 0
    global_step: int = 0
    bad_steps: int = 0  # consecutive non-finite losses

    def state_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state[f.name]))

    def start_stage(self, stage_index: int) -> None:
        """Counters for a stage that starts now (the global step goes on)."""
        self.stage_index, self.stage_step, self.epoch, self.step_in_epoch, self.bad_steps = stage_index, 0, 0, 0, 0

    def count_step(self) -> None:
        self.step_in_epoch += 1
        self.stage_step += 1
        self.global_step += 1

    def end_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0


class Clusters:
    """The run's cluster-level routing state (None until a stage computes it)."""

    def __init__(self) -> None:
        self.value: Optional[ClusterState] = None

    def state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        return None if self.value is None else self.value.state_dict()

    def load_state_dict(self, state: Optional[dict[str, torch.Tensor]]) -> None:
        self.value = None if state is None else ClusterState.from_state_dict(state)


class Generators:
    """Python's, NumPy's and torch's generators, and the GPU's on a CUDA device (dropout draws there)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        python = random.getstate()
        np_state = np.random.get_state()
        state = {
            "python": list(python[1]) + [python[0], python[2]],
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])],
            "torch": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        python = state["python"]
        random.setstate((python[-2], tuple(python[:-2]), python[-1]))
        keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
