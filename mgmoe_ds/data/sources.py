"""Where a dataset's shards are: one resolver for a dataset folder and for the registry.

A source is a dataset folder (or its ``manifest.json``), or ``"registry"`` / a registry ``.json``
file for every registered dataset under the registry's union label space. :func:`dataset_source`
resolves it once; the loaders read its shards (:func:`resolve_source`) and the feature cache keys
on its content (:meth:`DatasetSource.content_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .formats import DataError
from .registry import DEFAULT_REGISTRY, dataset_path, load_registry, union_label_map
from .shards import MANIFEST_NAME, load_manifest


@dataclass(frozen=True)
class ShardSpec:
    url: str  # path of the tar file
    count: int  # samples in it, from the manifest
    label_map: Optional[tuple[int, ...]] = None  # dataset class index -> union index (registry only)
    class_counts: Optional[tuple[tuple[int, int], ...]] = None  # (label, samples), loader labels; None: old manifest


@dataclass(frozen=True)
class DatasetPart:
    """One dataset folder of a source, with its manifest and its labels' place in the source's label space."""

    folder: Path
    manifest: dict[str, Any]
    label_map: Optional[tuple[int, ...]]  # dataset class index -> source class index; None: the same


@dataclass(frozen=True)
class DatasetSource:
    """A resolved source: its label space and its datasets."""

    classes: list[str]
    parts: list[DatasetPart]
    registry_path: Optional[Path] = None  # the registry file, when the source is one

    def splits(self) -> set[str]:
        """The splits some dataset of the source has shards of."""
        return {shard["split"] for part in self.parts for shard in part.manifest["shards"]}

    def content_bytes(self) -> bytes:
        """The bytes that describe the source's content: the registry file (if any) and every manifest."""
        files = ([self.registry_path] if self.registry_path is not None else [])
        files += [part.folder / MANIFEST_NAME for part in self.parts]
        return b"\0".join(path.read_bytes() for path in files)


def is_registry(source: str | Path) -> bool:
    path = Path(source)
    return str(source) == "registry" or (path.suffix == ".json" and path.name != MANIFEST_NAME)


def dataset_source(source: str | Path, registry: Optional[str | Path] = None) -> DatasetSource:
    """Resolves ``source`` (a dataset folder or manifest, or "registry" / a registry file).

    Args:
        source: see the module docstring.
        registry: the registry file when ``source == "registry"``; default ``shards/registry.json``.
    """
    if not is_registry(source):
        path = Path(source)
        folder = path.parent if path.is_file() else path
        manifest = load_manifest(path)
        return DatasetSource(list(manifest["classes"]), [DatasetPart(folder, manifest, None)])
    registry_path = Path(registry or DEFAULT_REGISTRY) if str(source) == "registry" else Path(source)
    registry_data = load_registry(registry_path)
    if not registry_data["datasets"]:
        raise DataError(f"{registry_path}: no datasets registered; run `mgmoe shards register DIR/NAME`")
    parts = []
    for _, entry in sorted(registry_data["datasets"].items()):
        folder = dataset_path(registry_path, entry)
        manifest = load_manifest(folder)
        parts.append(DatasetPart(folder, manifest, tuple(union_label_map(registry_data, manifest["classes"]))))
    return DatasetSource(list(registry_data["classes"]), parts, registry_path)


def resolve_source(
    source: str | Path, split: str, registry: Optional[str | Path] = None
) -> tuple[list[ShardSpec], list[str], list[int]]:
    """Find the shards, class names and per-class counts of ``split``.

    Args:
        source: a dataset folder (or its ``manifest.json``), or ``"registry"`` / a registry
            ``.json`` file for every registered dataset under the union label space.
        split: ``"train"``, ``"val"`` or ``"test"``.
        registry: the registry file when ``source == "registry"``; default ``shards/registry.json``.

    Returns:
        ``(shards, class_names, class_counts)``.
    """
    resolved = dataset_source(source, registry)
    classes = resolved.classes
    counts = [0] * len(classes)
    shards = []
    for part in resolved.parts:
        per_class = part.manifest["counts"].get(split, {}).get("per_class", {})
        for species, n in per_class.items():
            counts[classes.index(species)] += n
        shards += [ShardSpec(str(part.folder / s["path"]), s["count"], part.label_map,
                             shard_class_counts(s, part.label_map, len(classes), part.folder))
                   for s in part.manifest["shards"] if s["split"] == split]
    if not shards:
        raise DataError(f"{source}: no shards for split {split!r}")
    return shards, classes, counts


def shard_class_counts(
    entry: dict[str, Any], label_map: Optional[tuple[int, ...]], num_classes: int, folder: Path
) -> Optional[tuple[tuple[int, int], ...]]:
    """A manifest shard entry's ``per_class`` as sorted ``(label, samples)`` pairs in the loader's
    label space (through ``label_map`` for registry datasets); None when the entry has none.

    Args:
        entry: one item of the manifest's ``"shards"``.
        label_map: dataset class index -> union index, or None.
        num_classes: size of the loader's label space (the dataset's own without ``label_map``).
        folder: the dataset folder, for error messages.

    Returns:
        The pairs, or None for a manifest written before per-shard class counts.
    """
    per_class = entry.get("per_class")
    if per_class is None:
        return None
    labels_known = len(label_map) if label_map is not None else num_classes
    counts: dict[int, int] = {}
    for key, n in per_class.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < labels_known):
            raise DataError(f"{folder / MANIFEST_NAME}: shard {entry['path']}: per_class key {key!r}: "
                            f"expected a label index 0..{labels_known - 1} as a string")
        label = label_map[int(key)] if label_map is not None else int(key)
        counts[label] = counts.get(label, 0) + int(n)
    return tuple(sorted(counts.items()))
