"""The dataset registry: several shard datasets under one label space keyed by species name.

``shards/registry.json`` holds ``{"classes": [...], "datasets": {NAME: {...}}}``. The union class
list is append-only: registering a dataset adds only the species not already there, at the end,
so an index, once given, never moves and a model trained on the old registry keeps its head.
Dataset paths are stored relative to the registry file when they lie under its folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .formats import DataError
from .shards import load_manifest

DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "shards" / "registry.json"


def load_registry(path: Optional[Path | str] = None) -> dict[str, Any]:
    """Read a registry file; a missing file is an empty registry.

    Args:
        path: the registry file; default ``shards/registry.json`` in the repository.

    Returns:
        ``{"classes": [...], "datasets": {...}}``.
    """
    path = Path(path or DEFAULT_REGISTRY)
    if not path.exists():
        return {"classes": [], "datasets": {}}
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise DataError(f"{path}: not valid JSON ({exn})") from None
    if not isinstance(registry.get("classes"), list) or not isinstance(registry.get("datasets"), dict):
        raise DataError(f"{path}: expected {{\"classes\": [...], \"datasets\": {{...}}}}")
    return registry


def dataset_path(registry_path: Path | str, entry: dict[str, Any]) -> Path:
    """The absolute dataset folder of a registry entry."""
    path = Path(entry["path"])
    return path if path.is_absolute() else (Path(registry_path).resolve().parent / path)


def register_dataset(dataset_dir: Path | str, registry_path: Optional[Path | str] = None) -> dict[str, Any]:
    """Add (or refresh) a built dataset in the registry and extend the union class list.

    Args:
        dataset_dir: the dataset folder holding ``manifest.json``.
        registry_path: the registry file; default ``shards/registry.json``.

    Returns:
        The updated registry (also written to ``registry_path``).
    """
    registry_path = Path(registry_path or DEFAULT_REGISTRY)
    manifest = load_manifest(dataset_dir)
    registry = load_registry(registry_path)
    known = set(registry["classes"])
    added = [name for name in manifest["classes"] if name not in known]
    registry["classes"] = registry["classes"] + added
    folder = Path(dataset_dir).resolve()
    base = registry_path.resolve().parent
    stored = os.path.relpath(folder, base) if folder.is_relative_to(base) else str(folder)
    registry["datasets"][manifest["name"]] = {
        "path": Path(stored).as_posix(),
        "num_classes": len(manifest["classes"]),
        "counts": {split: table["total"] for split, table in manifest["counts"].items()},
    }
    registry_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = registry_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(registry, indent=1) + "\n", encoding="utf-8")
    tmp.replace(registry_path)
    return registry


def union_label_map(registry: dict[str, Any], classes: list[str]) -> list[int]:
    """Map a dataset's class indices to the registry's union indices (by species name)."""
    index = {name: i for i, name in enumerate(registry["classes"])}
    missing = [name for name in classes if name not in index]
    if missing:
        raise DataError(f"registry: species {missing[0]!r} is not registered; run `mgmoe shards register`")
    return [index[name] for name in classes]
