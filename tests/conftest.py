"""Shared fixtures: a tiny demo dataset and a tiny DeepSpeed config, made by the code itself."""

from __future__ import annotations

import copy
import json
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
