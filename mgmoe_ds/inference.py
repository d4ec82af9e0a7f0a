"""Loading a trained MG-MoE for inference in one process, and its inference routing.

``load_trained`` accepts a run folder (DeepSpeed checkpoints written at any expert-parallel size)
or an exported ``.safetensors`` file and returns the same thing for both: an ``MGMoE`` holding
every expert (expert_parallel_size 1, no process group) with the weights loaded strictly, and an
``InferenceMeta`` with the class names, the preprocessing and the routing policy. Eval, ablate,
export and predict all go through it, so the routing a trained model uses is decided here once.

Nothing is unpickled beyond tensors: checkpoints are read with ``torch.load(weights_only=True)``
and exports with safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from mgmoe_ds.config import RunConfig, config_from_dict
from mgmoe_ds.moe.routing import ClusterRouting, RoutingRequest



class InferenceError(ValueError):
    """A user-caused loading error (missing file, wrong format, refused pickle); one line."""


@dataclass(frozen=True)
class Preprocessing:
    """The eval transform a trained model expects (timm's resize + centre crop + normalise)."""

    img_size: int  # output side in pixels
    mean: tuple[float, ...]  # per-channel normalisation mean
    std: tuple[float, ...]  # per-channel normalisation std
    interpolation: str = "bilinear"  # resize interpolation
    crop_pct: float = 0.875  # resize to img_size / crop_pct, then crop
    crop_mode: str = "center"  # timm crop mode

    def transform_options(self) -> dict[str, Any]:
        """Keyword arguments for ``data.create_transform`` / ``make_loader(transform_options=)``."""
        return {"mean": self.mean, "std": self.std, "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class InferenceMeta:
    """Everything besides the weights that inference needs."""

    config: RunConfig  # the run's mgmoe block, with expert_parallel_size 1
    class_names: list[str]  # label order
    preprocessing: Preprocessing
    routing: RoutingRequest  # how the trained model routes (``Stage.inference_routing`` of its last stage)
    source: str  # the run folder or exported file it was loaded from
    checkpoint_tag: Optional[str] = None  # the DeepSpeed tag (run folders) or the tag it was exported from
    dataset: Optional[str] = None  # the training dataset recorded in the run
    final_stage: Optional[str] = None  # name of the curriculum stage the checkpoint ended
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------------------------------
# Safe tensor loading


def load_tensors(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers; anything else is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InferenceError(f"{path}: refused to load: it holds objects other than tensors ({first})") from None
    except FileNotFoundError:
        raise InferenceError(f"{path}: no such file") from None


def _run_state(folder: Path) -> Optional[dict[str, Any]]:
    """The checkpoint's progress and cluster state (``train.checkpoints.read_run_state``), tensors only."""
    from mgmoe_ds.train.checkpoints import read_run_state

    try:
        return read_run_state(folder)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InferenceError(f"{folder}: refused to load: its run state holds objects other than tensors "
                             f"({first})") from None


def trained_routing(config: RunConfig, final_stage: Any, clusters: Optional[dict[str, Tensor]]) -> RoutingRequest:
    """How a model routes after ``final_stage`` (its entry in ``curriculum.stages``): that stage's
    ``inference_routing`` with the run's cluster state, K the configured ``moe.top_k``."""
    from mgmoe_ds.curriculum import ClusterState, create_stage

    state = None if clusters is None else ClusterState.from_state_dict(clusters)
    routing = create_stage(final_stage, config, base_lr=1.0).inference_routing(state)
    return routing if routing.top_k is not None else routing.with_top_k(config.moe.top_k)


def _consolidated_state(checkpoint_dir: Path, tag: str) -> dict[str, Tensor]:
    from mgmoe_ds.moe.deepspeed_compat import consolidate_expert_checkpoint  # DeepSpeed only for run folders

    try:
        return consolidate_expert_checkpoint(str(checkpoint_dir), tag)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InferenceError(f"{checkpoint_dir / tag}: refused to load: a checkpoint file holds objects other "
                             f"than tensors ({first})") from None
    except FileNotFoundError as err:
        raise InferenceError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Building the single-process model


def inference_config(config: RunConfig) -> RunConfig:
    """The run config for one process: every expert local, no pretrained download, no drops, no
    teacher (``distill`` only shapes training; its files need not exist where the model is used).

    Capacity limits exist to bound all-to-all buffers in distributed training; in one process
    they would only make an image's prediction depend on which other images share its batch, so
    inference is dropless.
    """
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, pretrained=None),
        moe=dataclasses.replace(config.moe, expert_parallel_size=1, dropless=True),
        distill=None,
    )


def build_model(config: RunConfig, num_classes: int, state: Optional[dict[str, Tensor]] = None,
                source: str = "<state>"):
    """An ``MGMoE`` in eval mode with every expert; ``state`` (if given) is loaded strictly."""
    from mgmoe_ds.model import MGMoE

    model = MGMoE(config.model, config.moe, num_classes)
    if state is not None:
        load_weights(model, state, source)
    return model.eval()


def load_weights(model, state: dict[str, Tensor], source: str) -> None:
    """Loads ``state`` into ``model`` strictly; a mismatch is one line naming ``source``."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        summary = " ".join(str(err).split())[:300]
        raise InferenceError(f"{source}: weights do not match the configured model: {summary}") from None


def preprocessing_for(model) -> Preprocessing:
    """The eval transform the training loaders applied: the backbone's own normalisation and
    resize (``Backbone.preprocessing``, as the engine passes it) at the configured img_size."""
    options = model.backbone.preprocessing()
    return Preprocessing(img_size=model.model_config.img_size, mean=tuple(float(m) for m in options["mean"]),
                         std=tuple(float(x) for x in options["std"]), interpolation=str(options["interpolation"]),
                         crop_pct=float(options["crop_pct"]), crop_mode=str(options["crop_mode"]))


# ---------------------------------------------------------------------------------------------
# Run folders


def _run_class_names(run: dict[str, Any], num_classes: int) -> list[str]:
    """Class names as the run recorded them in config.json, else from its dataset when that is still
    readable (runs of earlier versions), else "class_<i>"."""
    recorded = run.get("class_names")
    if isinstance(recorded, list) and len(recorded) == num_classes:
        return [str(name) for name in recorded]
    dataset = run.get("dataset")
    if dataset:
        try:
            from mgmoe_ds.data import resolve_source

            _, names, _ = resolve_source(dataset, "train")
            if len(names) == num_classes:
                return list(names)
        except (ValueError, OSError):
            pass
    return [f"class_{i}" for i in range(num_classes)]


def _load_run(run_dir: Path, tag: Optional[str]):
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise InferenceError(f"{run_dir}: not a run folder (no config.json); pass a run folder or a .safetensors file")
    run = json.loads(config_path.read_text())
    config = inference_config(config_from_dict(run["mgmoe"], str(config_path)))
    pointer = run_dir / "checkpoints" / "last_good.json"
    if tag is None:
        if not pointer.is_file():
            raise InferenceError(f"{pointer}: missing; the run saved no complete checkpoint (or pass a tag)")
        tag = json.loads(pointer.read_text())["tag"]
    folder = run_dir / "checkpoints" / tag
    if not folder.is_dir():
        raise InferenceError(f"{folder}: no such checkpoint")
    state = _consolidated_state(run_dir / "checkpoints", tag)
    num_classes = int(run.get("num_classes") or config.model.num_classes)
    model = build_model(config, num_classes, state, str(folder))

    run_state = _run_state(folder) or {"progress": {}, "clusters": None}
    stage_index = int(run_state["progress"].get("stage_index", len(config.curriculum.stages) - 1))
    final_stage = config.curriculum.stages[stage_index]
    routing = trained_routing(config, final_stage, run_state.get("clusters"))
    meta = InferenceMeta(config=config, class_names=_run_class_names(run, num_classes),
                         preprocessing=preprocessing_for(model), routing=routing, source=str(run_dir),
                         checkpoint_tag=tag, dataset=run.get("dataset"), final_stage=final_stage.name)
    return model, meta


# ---------------------------------------------------------------------------------------------
# Exported files


def _load_safetensors(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InferenceError(f"{path}: not a readable safetensors file ({err})") from None
    from mgmoe_ds.export import FORMATS, state_from_export

    if metadata.get("format") not in FORMATS:
        raise InferenceError(f"{path}: metadata format = {metadata.get('format')!r}: expected one of "
                             f"{', '.join(map(repr, FORMATS))} (a file written by `mgmoe export`)")
    config = inference_config(config_from_dict(json.loads(metadata["mgmoe_config"]), f"{path} metadata"))
    class_names = json.loads(metadata["class_names"])
    model = build_model(config, len(class_names))
    try:
        load_weights(model, state_from_export(model, tensors, metadata["format"]), str(path))
    except KeyError as err:
        raise InferenceError(f"{path}: tensor {err.args[0]!r} is not in the configured model") from None
    routing_json = json.loads(metadata["routing"])
    clusters = None
    if routing_json["kind"] == "cluster":
        clusters = ClusterRouting(tensors["routing.centroids"].float(), tensors["routing.cluster_experts"].long())
    routing = RoutingRequest(top_k=routing_json["top_k"], clusters=clusters)
    source_info = json.loads(metadata.get("source", "{}"))
    meta = InferenceMeta(config=config, class_names=class_names,
                         preprocessing=Preprocessing.from_json(json.loads(metadata["preprocessing"])),
                         routing=routing, source=str(path), checkpoint_tag=source_info.get("checkpoint_tag"),
                         dataset=source_info.get("dataset"), final_stage=source_info.get("final_stage"))
    return model, meta


def load_trained(path: str | Path, *, tag: Optional[str] = None):
    """Loads a trained MG-MoE into this process.

    Args:
        path: a run folder (``RUN/config.json`` and ``RUN/checkpoints``; any expert-parallel size)
            or a ``.safetensors`` file written by ``mgmoe export``.
        tag: checkpoint tag in a run folder; default ``checkpoints/last_good.json``.

    Returns:
        ``(model, meta)``: an ``MGMoE`` on the CPU in eval mode with every expert, and its
        ``InferenceMeta``.

    Raises:
        InferenceError: the path is neither, a file is missing, holds non-tensor objects, or the
            weights do not match the configured model.
    """
    path = Path(path)
    if path.is_dir():
        return _load_run(path, tag)
    if path.is_file():
        return _load_safetensors(path)
    raise InferenceError(f"{path}: no such run folder or .safetensors file")


@torch.no_grad()
def routed_forward(model, meta: InferenceMeta, images: Tensor):
    """One forward with the trained model's inference routing -> ``ModelOutput``."""
    return model(images, routing=meta.routing)


def eval_transform(preprocessing: Preprocessing) -> Callable:
    """PIL image -> (3, H, W) tensor, exactly as the eval loaders transform."""
    from mgmoe_ds.data import create_transform

    return create_transform(preprocessing.img_size, False, **preprocessing.transform_options())
