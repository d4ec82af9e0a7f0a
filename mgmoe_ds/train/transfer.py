"""Starting a run from a trained model (``train.init_from``, ``jobs/train.py --init-from``).

The source, a run folder (checkpoints of any expert-parallel size) or an ``mgmoe export`` file, is
loaded on the CPU with ``inference.load_trained``; it must have this run's backbone, experts (by
name, in order) and image size. Its tensors are then copied into the freshly built model by
export name (``export.tensor_names``: the same names whichever experts a rank holds, so a rank
takes exactly its own experts). A tensor indexed by class (the rows of every classification head
and their bias entries) is copied class by class, matched by species name: the classes both label
spaces share keep what they learned, in whatever order each lists them, and a new class keeps its
freshly initialised row. The returned record says where the run started and what was and was not
copied; the trainer writes it to ``RUN/init_from.json``. No ``torch.distributed`` here: every rank
runs the same CPU load and ends with the same shared weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from mgmoe_ds.config import RunConfig

NAMES_RECORDED = 50  # the record lists the classes kept, new and dropped by name up to this many each
# Left at this run's initial value: the fusion head is used once this run's own fusion stage starts.
NOT_TRANSFERRED = frozenset({"fusion.active"})


class TransferError(ValueError):
    """``--init-from`` names no trained model, or one this run cannot start from; one line."""


def load_initial_weights(model, source_path: str | Path, class_names: list[str], config: RunConfig) -> dict[str, Any]:
    """Copies a trained model's weights into ``model`` (this run's, freshly built, on the CPU).

    Args:
        model: this run's ``MGMoE`` (this rank's experts only under expert parallelism).
        source_path: a run folder or an exported ``.safetensors`` file.
        class_names: this run's label space, in label order.
        config: this run's configuration.

    Returns:
        The record of the transfer (see :func:`transfer_record`), JSON-serialisable.

    Raises:
        TransferError: the path is no trained model, or one with another backbone, other experts,
            another image size or tensors of other shapes; or its class names are unknown while
            the label spaces differ.
    """
    from mgmoe_ds.export import tensor_names
    from mgmoe_ds.inference import InferenceError, build_model, inference_config, load_trained
    from mgmoe_ds.typed_json import ConfigError

    where = f"--init-from {source_path}"
    class_names = [str(name) for name in class_names]
    with torch.random.fork_rng(devices=[]):  # the run's generators draw as they would without --init-from
        try:
            source, meta = load_trained(source_path)
        except (InferenceError, ConfigError) as err:  # their messages start with the path already
            raise TransferError(f"--init-from: {_one_line(err)}") from None
        except (ValueError, KeyError, TypeError, OSError) as err:  # e.g. a config.json that is no run's
            raise TransferError(f"{where}: not a trained mgmoe model ({type(err).__name__}: {_one_line(err)})") from None
        _check_architecture(meta.config, config, where)
        source_classes = list(meta.class_names)
        _check_class_names(source_classes, class_names, meta.dataset, where)
        source_state = source.state_dict()
        source_tensors = {name: source_state[key] for key, name in tensor_names(source).items()}
        remap = source_classes != class_names
        if remap and len(source_classes) == len(class_names):
            # Same number of classes: a model with one class more shows which dimensions count classes.
            probe = build_model(inference_config(config), len(class_names) + 1)
            probe_state = probe.state_dict()
            reference = {name: tuple(probe_state[key].shape) for key, name in tensor_names(probe).items()}
            reference_classes = len(class_names) + 1
        else:
            reference = {name: tuple(value.shape) for name, value in source_tensors.items()}
            reference_classes = len(source_classes)
    # every shape checked before the first copy: a refused source leaves the model as it was built
    target_state, names = model.state_dict(), tensor_names(model)
    plan, left_at_init = [], []  # (name, this run's tensor, the source's, its class dimension or None)
    for key, name in names.items():
        target, value = target_state[key], source_tensors.get(name)
        if value is None or name in NOT_TRANSFERRED:
            left_at_init.append(name)
            continue
        dim = _class_dim(tuple(target.shape), reference.get(name), len(class_names), reference_classes)
        dim = dim if remap else None
        _check_shape(name, value, target, dim, len(source_classes), where)
        plan.append((name, target, value, dim))
    ours, theirs = _row_pairs(source_classes, class_names)
    with torch.no_grad():
        for name, target, value, dim in plan:
            if dim is None:
                target.copy_(value)
            elif ours.numel():
                target.index_copy_(dim, ours, value.index_select(dim, theirs).to(target.dtype))
    copied = [name for name, _, _, dim in plan if dim is None]
    mapped = [name for name, _, _, dim in plan if dim is not None]
    held_here, held_elsewhere = set(names.values()), _expert_prefixes(model, names)
    unused = sorted(n for n in source_tensors if n not in held_here and not n.startswith(held_elsewhere))
    return transfer_record(source_path, meta, source_classes, class_names, copied, mapped, left_at_init, unused)


def transfer_record(source_path: str | Path, meta: Any, source_classes: list[str], class_names: list[str],
                    copied: list[str], mapped: list[str], left_at_init: list[str], unused: list[str]) -> dict[str, Any]:
    """What ``RUN/init_from.json`` holds: where the run started and what came from there.

    Keys: ``source`` (as given) and ``source_resolved``, ``checkpoint_tag``, ``source_dataset``,
    ``source_final_stage``; ``tensors_copied`` (whole tensors, a count); ``class_tensors`` (the
    class-indexed tensors copied row by row, matched by species name); ``classes_kept``,
    ``classes_new`` (fresh rows), ``classes_dropped`` (the source's classes this run lacks), each
    ``{"count", "names"}`` (``names`` null past 50); ``left_at_init`` (this model's tensors the
    source lacks) and ``not_used`` (the source's tensors this model lacks).
    """
    known, ours = set(source_classes), set(class_names)
    return {
        "source": str(source_path), "source_resolved": str(Path(source_path).resolve()),
        "checkpoint_tag": meta.checkpoint_tag, "source_dataset": meta.dataset, "source_final_stage": meta.final_stage,
        "tensors_copied": len(copied), "class_tensors": mapped,
        "classes_kept": _classes([n for n in class_names if n in known]),
        "classes_new": _classes([n for n in class_names if n not in known]),
        "classes_dropped": _classes([n for n in source_classes if n not in ours]),
        "left_at_init": left_at_init, "not_used": unused,
    }


def write_record(record: dict[str, Any], path: Path) -> str:
    """Writes the record to ``path`` (``RUN/init_from.json``); returns the one-line summary to log."""
    path.write_text(json.dumps(record, indent=2) + "\n")
    kept, new, dropped = (record[k]["count"] for k in ("classes_kept", "classes_new", "classes_dropped"))
    tag = f" ({record['checkpoint_tag']})" if record["checkpoint_tag"] else ""
    return (f"started from {record['source']}{tag}: {record['tensors_copied']} tensors copied, "
            f"{len(record['class_tensors'])} class-indexed tensors mapped by species name ({kept} classes kept, "
            f"{new} new, {dropped} dropped), {len(record['left_at_init'])} tensors left at init; see {path}")


# ---------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _classes(names: list[str]) -> dict[str, Any]:
    return {"count": len(names), "names": names if len(names) <= NAMES_RECORDED else None}


def _check_architecture(source: RunConfig, run: RunConfig, where: str) -> None:
    """The same backbone, the same experts in the same order and the same image size."""
    for key, theirs, ours in (("model.backbone", source.model.backbone, run.model.backbone),
                              ("model.experts", [s.name for s in source.model.experts],
                               [s.name for s in run.model.experts]),
                              ("model.img_size", source.model.img_size, run.model.img_size)):
        if theirs != ours:
            raise TransferError(f"{where}: {key} = {theirs!r} but this run's is {ours!r}")


def _check_class_names(source_classes: list[str], class_names: list[str], dataset: Optional[str], where: str) -> None:
    """Classes are matched by name, so a source whose names are unknown fits only the same placeholders."""
    placeholders = [f"class_{i}" for i in range(len(source_classes))]
    if source_classes == placeholders and class_names != placeholders:
        raise TransferError(f"{where}: its class names are unknown (its config.json records none and its dataset "
                            f"{dataset!r} is not readable), so its {len(source_classes)} classes cannot be matched "
                            f"to this run's {len(class_names)} by species name")


def _row_pairs(source_classes: list[str], class_names: list[str]) -> tuple[Tensor, Tensor]:
    """(this run's labels, the source's labels) of the classes both have, matched by name."""
    index = {name: i for i, name in enumerate(source_classes)}
    pairs = [(label, index[name]) for label, name in enumerate(class_names) if name in index]
    return (torch.tensor([p[0] for p in pairs], dtype=torch.long),  # (S,)
            torch.tensor([p[1] for p in pairs], dtype=torch.long))  # (S,)


def _class_dim(shape: tuple[int, ...], reference: Optional[tuple[int, ...]], classes: int,
               reference_classes: int) -> Optional[int]:
    """The one dimension of a tensor that counts classes (``classes`` here, ``reference_classes``
    in the reference model's tensor, every other dimension equal), or None."""
    if reference is None or len(reference) != len(shape):
        return None
    differ = [d for d in range(len(shape)) if shape[d] != reference[d]]
    if len(differ) == 1 and shape[differ[0]] == classes and reference[differ[0]] == reference_classes:
        return differ[0]
    return None


def _check_shape(name: str, value: Tensor, target: Tensor, dim: Optional[int], source_classes: int, where: str) -> None:
    expected = list(target.shape)
    if dim is not None:
        expected[dim] = source_classes
    if list(value.shape) != expected:
        raise TransferError(f"{where}: tensor {name} has shape {tuple(value.shape)} there but {tuple(target.shape)} "
                            f"in this run (model.backbone_options, an expert's options or model.backbone_moe differ)")


def _expert_prefixes(model, names: dict[str, str]) -> tuple[str, ...]:
    """The export prefix (``[<layer>.]experts.<label>.``) of every expert of every routed layer,
    those other expert-parallel ranks hold included."""
    from mgmoe_ds.model import HEAD_LAYER

    prefixes = []
    for layer_name, layer in model.moe_layers().items():
        first = f"{layer_name}.deepspeed_moe.experts.deepspeed_experts.0."  # each rank holds at least one
        key = next(k for k in names if k.startswith(first))
        labels = model.expert_labels if layer_name == HEAD_LAYER else [str(e) for e in range(layer.num_experts)]
        exported = names[key][: len(names[key]) - len(key) + len(first)]  # "<top>experts.<label of local 0>."
        top = exported[: len(exported) - len(f"experts.{labels[layer.global_expert_ids[0]]}.")]
        prefixes += [f"{top}experts.{label}." for label in labels]
    return tuple(prefixes)
