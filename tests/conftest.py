"""Shared fixtures: a tiny demo dataset and a tiny DeepSpeed config, made by the code itself."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests' own helpers (dist_utils, toy_experts)

TINY_MGMOE = {
    "model": {
        "backbone": "vit_tiny_patch16_224",
        "img_size": 32,
        "backbone_options": {"patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2},
        "experts": [
            {"name": "mpsa", "options": {"dim": 32, "num_parts": [4, 4, 2, 2]}},
            {"name": "pmg", "options": {"mid_channels": 16, "out_channels": 16, "hidden": 32}},
            {"name": "transfg"},
            {"name": "pim", "options": {"dim": 32}},
        ],
    },
    "moe": {"top_k": 2, "capacity_factor": 2.0, "min_capacity": 2},
    "data": {"num_workers": 0, "shuffle_buffer": 50},
    "curriculum": {
        "stages": [{"name": "warmup", "steps": 4}, {"name": "routing", "steps": 4}, {"name": "residual", "steps": 4}],
        "num_clusters": 3,
    },
    "train": {"seed": 0, "log_every": 2},
}
TINY_DS = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "steps_per_print": 100000,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.002, "weight_decay": 0.01, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 4-species demo birds set, 32 px, a few shards per split."""
    from mgmoe_ds.data import build_demo

    root = tmp_path_factory.mktemp("data")
    return build_demo(root, name="tiny_birds", num_classes=4, train_images=96, val_per_class=6, test_per_class=4,
                      image_size=32, shard_size=24, seed=1)


def write_tiny_config(path: Path, **mgmoe_changes) -> Path:
    """Writes the tiny DeepSpeed JSON; keyword arguments replace top-level sections of its mgmoe block."""
    block = copy.deepcopy(TINY_MGMOE)
    for key, value in mgmoe_changes.items():
        block[key] = dict(block.get(key, {}), **value) if isinstance(value, dict) else value
    path.write_text(json.dumps({**TINY_DS, "mgmoe": block}, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# Training jobs as a user runs them, and small data sets made to order

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
# The real experts with their random draws off (part dropout, dropout, the jigsaw's permutation):
# a run at P = 1 and one at P = 2 draw different random numbers, so only without them can their
# weights be compared. Their own mean-reduced losses stay on.
EQUIVALENCE_EXPERTS = [
    {"name": "mpsa", "options": {"dim": 32, "num_parts": [4, 4, 2, 2], "part_drop": 0.0, "dropout": 0.0}},
    {"name": "pmg", "options": {"mid_channels": 16, "out_channels": 16, "hidden": 32, "granularities": [1, 1, 1]}},
    {"name": "transfg"},
    {"name": "pim", "options": {"dim": 32, "dropout": 0.0}},
]
THREE_STAGES = {"stages": [{"name": "warmup", "steps": 3}, {"name": "routing", "steps": 3},
                           {"name": "residual", "steps": 3}], "num_clusters": 2}


def launch_training(config: Path, dataset: Path, run: Path, *, ranks: int = 1, resume: bool = False,
                    timeout: float = 420, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``jobs/train.py`` in a fresh process: one rank without a launcher, or ``ranks`` CPU ranks
    through DeepSpeed's launcher. Returns the finished process (the caller checks its code)."""
    from dist_utils import free_port

    command = [sys.executable] if ranks == 1 else [DEEPSPEED, "--num_gpus", str(ranks), "--master_port",
                                                   str(free_port())]
    command += [str(ROOT / "jobs" / "train.py"), "--deepspeed", str(config), "--data", str(dataset)]
    command += ["--resume", str(run)] if resume else ["--output", str(run)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(command + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def write_equivalence_config(path: Path, expert_parallel_size: int) -> Path:
    return write_tiny_config(path, model=dict(TINY_MGMOE["model"], experts=EQUIVALENCE_EXPERTS),
                             moe={"expert_parallel_size": expert_parallel_size}, curriculum=THREE_STAGES,
                             train={"seed": 0, "log_every": 2, "checkpoint_every": 2})


@pytest.fixture(scope="session")
def two_rank_runs(tiny_dataset, tmp_path_factory) -> dict[int, dict]:
    """The same job on two ranks at P = 1 (plain data parallelism) and at P = 2, every stage.

    Returns ``{P: {"config", "run", "output"}}``.
    """
    runs = {}
    for ep in (1, 2):
        folder = tmp_path_factory.mktemp(f"two_ranks_p{ep}")
        config = write_equivalence_config(folder / "ds.json", ep)
        result = succeeded(launch_training(config, tiny_dataset, folder / "run", ranks=2))
        runs[ep] = {"config": config, "run": folder / "run", "output": result.stdout + result.stderr}
    return runs


# The trained run and its eval report serve test_evaluation.py (eval, ablate) and
# test_inference.py (export, and predict checked against eval's predictions).
INFERENCE_STAGES = {"stages": [{"name": "warmup", "steps": 3}, {"name": "routing", "steps": 3},
                               {"name": "residual", "steps": 3}], "num_clusters": 3}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dataset) -> Path:
    """One tiny single-process run through warmup, routing and residual (cluster-level routing)."""
    tmp = tmp_path_factory.mktemp("inference_run")
    config = write_tiny_config(tmp / "ds.json", curriculum=INFERENCE_STAGES)
    succeeded(launch_training(config, tiny_dataset, tmp / "run"))
    return tmp / "run"


@pytest.fixture(scope="session")
def eval_report(trained_run, tiny_dataset, tmp_path_factory) -> Path:
    """The folder ``mgmoe eval`` wrote for ``trained_run`` on the tiny test split."""
    from mgmoe_ds.cli import main

    out = tmp_path_factory.mktemp("eval")
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(tiny_dataset), "--out", str(out),
                 "--no-progress"]) == 0
    return out


def write_small_set(root: Path, name: str, sizes: dict[str, int], shard_size: int, *, num_classes: int = 4,
                    corrupt: tuple[int, ...] = (), seed: int = 0) -> Path:
    """A dataset written by the real shard writer: ``sizes[split]`` samples per split in shards of
    equal size at most ``shard_size``, classes in turn, 32 px JPEGs; the training samples at the
    indices in ``corrupt`` hold bytes that are no image (as a damaged file would)."""
    import io

    import numpy as np
    from PIL import Image

    from mgmoe_ds.data.shards import Sample, write_dataset

    rng = np.random.default_rng(seed)
    classes = [f"species_{i}" for i in range(num_classes)]

    def samples(split: str):
        for i in range(sizes[split]):
            label = i % num_classes
            if split == "train" and i in corrupt:
                data = b"\xff\xd8\xff\xe0 damaged in transfer"
            else:
                pixels = rng.integers(0, 60, (32, 32, 3)) + np.array([60 * label, 255 - 60 * label, 120])
                buffer = io.BytesIO()
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG")
                data = buffer.getvalue()
            yield Sample(key=f"{split}_{i:05d}", data=data, ext="jpg", label=label, meta={"split": split})

    return write_dataset({split: samples(split) for split in sizes}, classes, root, name, shard_size=shard_size,
                         skipped=[], options={}, source="tests", split_sizes=sizes)


@pytest.fixture
def world_of_one():
    """A gloo process group of one rank in this process (the trainer's collectives need one), removed afterwards."""
    import torch.distributed as dist

    from dist_utils import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
