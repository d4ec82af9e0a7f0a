"""What ``eval`` and ``ablate`` both start from: arguments, device, output folder, model and loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from mgmoe_ds.inference import InferenceMeta, load_trained


@dataclass
class EvaluationArgs:
    """What ``eval`` and ``ablate`` both take."""

    checkpoint: Path  # a run folder or an exported .safetensors file
    data: Optional[str] = None  # dataset folder; default: the one the run trained on
    out: Optional[Path] = None  # output folder; default: next to the checkpoint
    split: str = "test"
    batch_size: int = 32
    num_workers: int = 0
    progress: bool = True
    device: Optional[str] = None  # default: "cuda" when available, else "cpu"


def resolve_device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_out(checkpoint: Path, name: str) -> Path:
    """RUN/<name> for a run folder, else <file stem>_<name> next to an exported file."""
    checkpoint = Path(checkpoint)
    return checkpoint / name if checkpoint.is_dir() else checkpoint.with_name(f"{checkpoint.stem}_{name}")


def eval_loader(meta: InferenceMeta, data: Optional[str], split: str, batch_size: int, num_workers: int = 0):
    """The split's loader with the model's preprocessing, and the class counts of its train split."""
    from mgmoe_ds.data import make_loader, resolve_source

    source = data or meta.dataset
    if not source:
        raise ValueError(f"{meta.source}: no dataset recorded; pass --data")
    loader, info = make_loader(source, split, batch_size=batch_size, img_size=meta.preprocessing.img_size,
                               train=False, num_workers=num_workers, shuffle=False,
                               transform_options=meta.preprocessing.transform_options())
    if info.num_classes != meta.num_classes:
        raise ValueError(f"{source}: {info.num_classes} classes but the model {meta.source} has {meta.num_classes}")
    try:
        _, _, train_counts = resolve_source(source, "train")
    except ValueError:  # no train split: bucket by the evaluated split's own counts
        train_counts = info.class_counts
    return loader, info, list(train_counts)


@dataclass
class LoadedRun:
    """What ``eval`` and ``ablate`` both start from."""

    model: Any
    meta: InferenceMeta
    device: torch.device
    out_dir: Path
    loader: Any
    info: Any
    train_counts: list[int]


def load_for_evaluation(args: Any, default_name: str) -> LoadedRun:
    """Loads the model onto its device, makes the output folder and the split's loader.

    Args:
        args: ``EvalArgs`` or ``AblateArgs`` (checkpoint, device, out, data, split, batch_size,
            num_workers).
        default_name: the output folder's name when ``args.out`` is not given.
    """
    model, meta = load_trained(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    out_dir = Path(args.out) if args.out is not None else default_out(args.checkpoint, default_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader, info, train_counts = eval_loader(meta, args.data, args.split, args.batch_size, args.num_workers)
    return LoadedRun(model, meta, device, out_dir, loader, info, train_counts)
