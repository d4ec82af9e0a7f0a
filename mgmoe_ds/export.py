"""``mgmoe export``: one ``.safetensors`` file with every expert, the router and the backbone.

Tensors are named by what they are, not by DeepSpeed's module paths: ``backbone.*`` (the timm
model), ``router.*``, ``fallback.*`` and ``experts.<name>.*`` (``experts.pmg.concat_head.0.weight``;
an expert name given twice becomes ``<name>_<global id>``), whatever expert-parallel size the run
trained with. So one expert's weights load into ``create_expert(name, ...)`` directly. When the
model routes at cluster level, the centroids and each cluster's allowed experts are under
``routing.``. The string metadata carries JSON: the mgmoe config block, the class names, the
preprocessing and the routing, so that ``mgmoe predict`` needs nothing else. Files of the
earlier format (the state dict under ``model.``) still load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch import Tensor

from mgmoe_ds.config import config_to_dict
from mgmoe_ds.inference import InferenceMeta, load_trained

FORMAT_NAME = "mgmoe-ds/2"  # metadata "format": tensors named by what they are
LEGACY_FORMAT = "mgmoe-ds/1"  # the state dict under "model."
FORMATS = (FORMAT_NAME, LEGACY_FORMAT)
ROUTING_PREFIX = "routing."


def _readable(path: str) -> str:
    return "backbone." + path[len("backbone.model."):] if path.startswith("backbone.model.") else path


def tensor_names(model) -> dict[str, str]:
    """The export name of every tensor of ``model``'s state dict: ``{state-dict key: export name}``.

    The head layer's router, fallback head and experts go to the top level; any other routed
    layer keeps its (readable) module path in front of them.
    """
    from mgmoe_ds.model import HEAD_LAYER

    labels = model.expert_labels
    prefixes: dict[str, str] = {}  # state-dict prefix -> export prefix, most specific first
    for layer_name, layer in model.moe_layers().items():
        top = "" if layer_name == HEAD_LAYER else _readable(layer_name) + "."
        for local, global_id in enumerate(layer.global_expert_ids):
            label = labels[global_id] if layer_name == HEAD_LAYER else str(global_id)
            prefixes[f"{layer_name}.deepspeed_moe.experts.deepspeed_experts.{local}."] = f"{top}experts.{label}."
        prefixes[f"{layer_name}.router."] = f"{top}router."
        prefixes[f"{layer_name}.fallback_head."] = f"{top}fallback."
    names = {}
    for key in model.state_dict():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        names[key] = prefixes[prefix] + key[len(prefix):] if prefix is not None else _readable(key)
    return names


def export_tensors(model, meta: InferenceMeta) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (named by :func:`tensor_names`) and string metadata of an export."""
    names = tensor_names(model)
    tensors = {names[k]: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    clusters = meta.routing.clusters
    if clusters is not None:
        tensors[ROUTING_PREFIX + "centroids"] = clusters.centroids.float().contiguous().clone()  # (C, D)
        tensors[ROUTING_PREFIX + "cluster_experts"] = clusters.cluster_experts.long().contiguous().clone()  # (C, k)
    metadata = {
        "format": FORMAT_NAME,
        "mgmoe_config": json.dumps(config_to_dict(meta.config)),
        "class_names": json.dumps(meta.class_names),
        "preprocessing": json.dumps(meta.preprocessing.to_json()),
        "routing": json.dumps(meta.routing.to_json()),
        "source": json.dumps({"path": meta.source, "checkpoint_tag": meta.checkpoint_tag, "dataset": meta.dataset,
                              "final_stage": meta.final_stage}),
    }
    return tensors, metadata


def state_from_export(model, tensors: dict[str, Tensor], file_format: str) -> dict[str, Tensor]:
    """The state dict of ``model`` from an export's tensors (the routing tensors left out).

    Raises:
        KeyError: naming an exported tensor the model does not have.
    """
    if file_format == LEGACY_FORMAT:
        return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    keys = {name: key for key, name in tensor_names(model).items()}
    return {keys[name]: value for name, value in tensors.items() if not name.startswith(ROUTING_PREFIX)}


def save_export(model, meta: InferenceMeta, out: str | Path) -> Path:
    """Writes ``model`` and ``meta`` to ``out`` (a ``.safetensors`` file); returns the path."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = export_tensors(model, meta)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(out)  # a crash mid-write never leaves a truncated file under the final name
    return out


def export_model(checkpoint: str | Path, out: str | Path, tag: Optional[str] = None) -> Path:
    """Consolidates a run folder's checkpoint (any expert-parallel size) into one exported file.

    Args:
        checkpoint: the run folder (or an exported file, which is re-exported).
        out: the ``.safetensors`` file to write.
        tag: checkpoint tag; default the run's last good checkpoint.
    """
    model, meta = load_trained(checkpoint, tag=tag)
    return save_export(model, meta, out)
