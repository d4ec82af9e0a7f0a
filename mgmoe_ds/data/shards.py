"""Writing webdataset shards and their manifest.

A dataset ``NAME`` built into ``OUT`` is the folder ``OUT/NAME`` with ``NAME-{split}-NNNNNN.tar``
shards and a ``manifest.json``. Each sample has ``__key__``, the original image bytes under their
real extension (``jpg``, ``png``, ...), ``cls`` (the class index, as ASCII) and ``json`` (species,
dataset, original relative path, split, and ``bbox``: ``[x, y, w, h]`` in pixels of the stored
image, or null). A box is checked against its image when the shards are built: one that
overhangs the image by at most a pixel is clipped to it, and one that is not finite, has no
positive size or lies outside the image is dropped (the image is kept). The manifest's ``boxes``
gives per split the samples stored ``with_box`` and ``without_box`` (a dropped box counts as
without) and, for a build that checked them, the boxes ``clipped``, those ``dropped`` by reason
and the first few dropped as ``examples``. A split fills the fewest shards of at most
``shard_size`` samples, all of (nearly) equal size. Shards are byte-for-byte reproducible:
items are sorted, then shuffled with a fixed seed (so that each shard mixes classes), and every
tar entry has the same mtime, owner and mode. The mtime is a whole number of seconds, so each
member is one plain ustar header (a float mtime makes ``tarfile`` add a PAX header, two more
blocks, to every member).

The ``unlabelled`` split (``mgmoe shards build --unlabelled``) holds images without a class: its
samples have no ``cls``, their ``json`` has ``"species": null`` and ``"label": null``, its shard
entries have no ``per_class``, and the manifest's ``counts.unlabelled`` is ``{"total": n}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from .boxes import BOX_DROP_REASONS, check_box
from .formats import SPLIT_NAMES, UNLABELLED_SPLIT, DataError, Item, Listing, image_extension
from .transforms import decode_image, image_size

SHARD_MTIME = 946684800  # 2000-01-01T00:00:00Z on every tar entry, for reproducible shards
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
BOX_EXAMPLES = 5  # dropped boxes named per split in the manifest (the counts are always exact)
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Sample:
    key: str  # webdataset __key__ (no dots)
    data: bytes  # encoded image
    ext: str  # image extension without the dot
    label: Optional[int]  # index into the dataset's class list; None in the unlabelled split (no cls)
    meta: dict[str, Any]  # the sample's "json" entry


def check_dataset_name(name: str) -> str:
    """Dataset names become file names and sample keys: letters, digits, ``_`` and ``-`` only."""
    if not _NAME_PATTERN.match(name):
        raise DataError(f"--name = {name!r}: use letters, digits, '_' and '-' only")
    return name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_pattern(out_dir: Path, name: str, split: str) -> str:
    return str(out_dir / f"{name}-{split}-%06d.tar")


def shard_sizes(count: int, shard_size: int) -> list[int]:
    """Samples per shard for ``count`` samples: the fewest shards of at most ``shard_size``, with
    sizes that differ by at most one, so that workers and ranks, which get whole shards, get
    equal shares (720 samples at 100 per shard: 8 shards of 90, not 7 of 100 and one of 20)."""
    shards = max(1, math.ceil(count / shard_size))
    return [count // shards + (index < count % shards) for index in range(shards)]


def _resize_bytes(data: bytes, ext: str, max_side: int) -> tuple[bytes, str, tuple[float, float]]:
    """The image shrunk to a longer side of ``max_side`` (when larger), and the scale of each axis."""
    image = Image.open(io.BytesIO(data))
    if max(image.size) <= max_side:
        return data, ext, (1.0, 1.0)
    image = decode_image(data, min_side=None)
    scale = max_side / max(image.size)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    axis_scales = (resized.width / image.width, resized.height / image.height)  # the rounded sizes' exact ratios
    out = io.BytesIO()
    if ext in ("jpg", "jpeg"):
        resized.save(out, format="JPEG", quality=95)
        return out.getvalue(), ext, axis_scales
    resized.save(out, format="PNG")
    return out.getvalue(), "png", axis_scales


def load_image_bytes(item: Item, max_side: Optional[int] = None
                     ) -> tuple[bytes, str, Optional[tuple[float, float, float, float]]]:
    """The bytes, extension and box to store for ``item``: the file and box as they are, or the
    image resized to ``max_side`` with its box scaled along."""
    data, ext = item.path.read_bytes(), image_extension(item.path)
    if max_side is None:
        return data, ext, item.bbox
    data, ext, (scale_x, scale_y) = _resize_bytes(data, ext, max_side)
    if item.bbox is None:
        return data, ext, None
    x, y, w, h = item.bbox
    return data, ext, (x * scale_x, y * scale_y, w * scale_x, h * scale_y)


def check_images(listing: Listing, name: str, progress: bool = True
                 ) -> tuple[list[Item], list[dict], dict[str, str]]:
    """Read and decode every listed image once; bad files are skipped with a reason, and each
    box is checked against its image (:func:`mgmoe_ds.data.boxes.check_box`).

    Args:
        listing: the output of a reader in :mod:`mgmoe_ds.data.formats`.
        name: the dataset name (progress bar label).
        progress: show a tqdm bar of files done.

    Returns:
        ``(good, skipped, box_status)``: the readable items, with their boxes clipped to the image
        or dropped (None); ``{"path", "reason"}`` for the other files; and, by relative path, the
        status of each readable item's box: ``"ok"``, ``"clipped"`` or why it was dropped.
    """
    good, skipped, box_status = [], [], {}
    for item in tqdm(listing.items, desc=f"{name}: reading", unit="file", disable=not progress):
        ext = image_extension(item.path)
        if ext is None:
            skipped.append({"path": item.relpath, "reason": "not an image file extension"})
            continue
        try:
            data = item.path.read_bytes()
            decode_image(data, min_side=64)  # a reduced-size decode still reads every byte
            size = image_size(data)  # (width, height) at full size
        except Exception as exn:  # any unreadable file is skipped, never fatal
            skipped.append({"path": item.relpath, "reason": f"{type(exn).__name__}: {exn}".splitlines()[0]})
            continue
        if item.bbox is not None:
            box, box_status[item.relpath] = check_box(item.bbox, size)
            item = replace(item, bbox=box)
        good.append(item)
    return good, skipped, box_status


def box_check_table(items: list[Item], box_status: dict[str, str], listed: dict[str, Any]) -> dict[str, Any]:
    """Per split, the boxes :func:`check_images` clipped to their image, and those it dropped, by
    reason, with the first few named (``"path: reason (bbox [x, y, w, h])"``).

    Args:
        items: the items written, after :func:`check_images`.
        box_status: :func:`check_images`'s status of each box, by relative path.
        listed: each item's box as listed (before the check), by relative path.
    """
    table: dict[str, Any] = {}
    for item in items:
        split = table.setdefault(item.split, {"clipped": 0, "dropped": dict.fromkeys(BOX_DROP_REASONS, 0),
                                              "examples": []})
        status = box_status.get(item.relpath)
        if status == "clipped":
            split["clipped"] += 1
        elif status in BOX_DROP_REASONS:
            split["dropped"][status] += 1
            if len(split["examples"]) < BOX_EXAMPLES:
                split["examples"].append(f"{item.relpath}: {status} (bbox {list(listed[item.relpath])})")
    return {split: table[split] for split in (*SPLIT_NAMES, UNLABELLED_SPLIT) if split in table}


def write_shards(
    samples: Iterable[Sample],
    out_dir: Path,
    name: str,
    split: str,
    shard_size: int,
    count: Optional[int] = None,
) -> tuple[list[dict[str, Any]], list[int], int]:
    """Write the samples of one split as ``out_dir/NAME-{split}-NNNNNN.tar``.

    Args:
        samples: the samples, in the order they go into the shards.
        out_dir: the dataset folder.
        name: the dataset name.
        split: the split name, part of the file names.
        shard_size: the most samples per shard.
        count: the number of samples, when known: the shards then get equal sizes
            (:func:`shard_sizes`); None fills each shard up to ``shard_size`` in turn.

    Returns:
        One ``{"path", "split", "count", "sha256", "per_class"}`` entry per shard, with ``path``
        relative to ``out_dir`` and ``per_class`` the samples of each label present, keyed by the
        label index as a string (what re-balancing needs to know a pass's length in advance; the
        unlabelled split's entries have none); the label of every sample written (None for a
        sample without one, stored without ``cls``); and how many of them have a box.
    """
    planned = shard_sizes(count, shard_size) if count is not None else []
    counts: dict[str, int] = {}  # shard file -> samples, in write order
    class_counts: dict[str, dict[int, int]] = {}  # shard file -> label -> samples
    labels: list[int] = []
    with_box = 0
    writer, path, capacity = None, "", 0
    for sample in samples:
        if writer is None or counts[path] == capacity:
            if writer is not None:
                writer.close()
            index = len(counts)
            path = shard_pattern(out_dir, name, split) % index
            capacity = planned[index] if index < len(planned) else shard_size
            writer = TarWriter(path, encoder=False, mtime=SHARD_MTIME, mode=0o0444)
            counts[path], class_counts[path] = 0, {}
        if (sample.label is None) != (split == UNLABELLED_SPLIT):
            raise ValueError(f"{sample.key}: split {split!r} with label {sample.label}: only the "
                             f"{UNLABELLED_SPLIT} split, and all of it, has no labels")
        writer.write({
            "__key__": sample.key,
            sample.ext: sample.data,
            **({"cls": str(sample.label).encode("ascii")} if sample.label is not None else {}),
            "json": json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
        })
        counts[path] += 1
        if sample.label is not None:
            class_counts[path][sample.label] = class_counts[path].get(sample.label, 0) + 1
        labels.append(sample.label)
        with_box += sample.meta.get("bbox") is not None
    if writer is not None:
        writer.close()
    shards = [{"path": Path(fname).name, "split": split, "count": shard_count, "sha256": sha256_file(Path(fname)),
               **({"per_class": {str(label): n for label, n in sorted(class_counts[fname].items())}}
                  if split != UNLABELLED_SPLIT else {})}
              for fname, shard_count in counts.items()]
    return shards, labels, with_box


def count_table(classes: list[str], labels_by_split: dict[str, list[int]]) -> dict[str, Any]:
    """Counts per split (``total`` and ``per_class`` by class name; the unlabelled split: ``total``)."""
    table = {}
    for split, labels in labels_by_split.items():
        if split == UNLABELLED_SPLIT:
            table[split] = {"total": len(labels)}
            continue
        per_class = [0] * len(classes)
        for label in labels:
            per_class[label] += 1
        table[split] = {"total": len(labels), "per_class": dict(zip(classes, per_class))}
    return table


def write_dataset(
    samples_by_split: dict[str, Iterable[Sample]],
    classes: list[str],
    out: Path,
    name: str,
    *,
    shard_size: int,
    skipped: list[dict],
    options: dict[str, Any],
    source: str,
    split_sizes: Optional[dict[str, int]] = None,
    boxes: Optional[dict[str, Any]] = None,
) -> Path:
    """Write every split's shards and the manifest into ``out/NAME``; old shards are removed.

    Args:
        samples_by_split: split name -> samples in shard order (may be generators).
        classes: class names in index order.
        out: the parent folder.
        name: the dataset name.
        shard_size: the most samples per shard.
        skipped: ``{"path", "reason"}`` for every input left out.
        options: the command's options, recorded in the manifest.
        source: where the data came from (recorded in the manifest).
        split_sizes: samples per split, when known, for equal shard sizes (see :func:`write_shards`).
        boxes: per split, what checking the boxes found (:func:`box_check_table`), when they were
            checked; the manifest's ``boxes`` adds it to the samples written with and without a box.

    Returns:
        The dataset folder ``out/NAME``.
    """
    out_dir = Path(out) / check_dataset_name(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{name}-*.tar"):
        old.unlink()
    shards, labels, box_counts = [], {}, {}
    for split in (*SPLIT_NAMES, UNLABELLED_SPLIT):
        if split in samples_by_split:
            split_shards, split_labels, with_box = write_shards(samples_by_split[split], out_dir, name, split,
                                                                shard_size, (split_sizes or {}).get(split))
            shards += split_shards
            if split_labels:
                labels[split] = split_labels
                box_counts[split] = dict({"with_box": with_box, "without_box": len(split_labels) - with_box},
                                         **(boxes or {}).get(split, {}))
    manifest = {
        "version": MANIFEST_VERSION,
        "name": name,
        "source": source,
        "classes": classes,
        "counts": count_table(classes, labels),
        "shards": shards,
        "boxes": box_counts,
        "skipped": skipped,
        "options": options,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out_dir


def build_shards(
    listing: Listing,
    out: Path,
    name: str,
    *,
    source: str,
    shard_size: int = 1000,
    max_side: Optional[int] = None,
    seed: int = 0,
    options: Optional[dict[str, Any]] = None,
    progress: bool = True,
) -> Path:
    """Read, check and write a listed dataset as shards with a manifest.

    Args:
        listing: from :func:`mgmoe_ds.data.formats.read_listing`.
        out: the parent folder of the dataset folder.
        name: the dataset name.
        source: the source path, recorded in the manifest and in each sample's json.
        shard_size: the most samples per shard.
        max_side: resize (and re-encode) images whose longer side exceeds this; boxes scale along.
        seed: the seed of the within-split order (fixed, so shards are reproducible).
        options: the command's options for the manifest.
        progress: show a tqdm progress bar.

    Returns:
        The dataset folder ``out/NAME``.
    """
    check_dataset_name(name)
    good, skipped, box_status = check_images(listing, name, progress)
    present = {item.label for item in good if item.split != UNLABELLED_SPLIT}
    for label, class_name in enumerate(listing.classes):
        if label not in present:
            raise DataError(f"{source}: class {class_name!r} has no readable images")
    by_split: dict[str, list[Item]] = {}
    for item in sorted(good, key=lambda it: it.relpath):
        by_split.setdefault(item.split, []).append(item)
    bar = tqdm(total=len(good), desc=f"{name}: writing", unit="file", disable=not progress)

    def split_samples(split: str, items: list[Item]) -> Iterable[Sample]:
        for index, item in enumerate(items):
            data, ext, box = load_image_bytes(item, max_side)
            bar.update(1)
            meta = {"species": listing.classes[item.label] if item.label is not None else None, "dataset": name,
                    "path": item.relpath, "split": split, "bbox": list(box) if box is not None else None}
            if item.label is None:
                meta["label"] = None  # said outright: this image has no class
            yield Sample(key=f"{name}_{split}_{index:07d}", data=data, ext=ext, label=item.label, meta=meta)

    samples_by_split = {}
    for split, items in by_split.items():
        random.Random(f"{seed}:{split}").shuffle(items)
        samples_by_split[split] = split_samples(split, items)
    out_dir = write_dataset(samples_by_split, listing.classes, out, name, shard_size=shard_size,
                            skipped=listing.skipped + skipped, options=options or {}, source=source,
                            split_sizes={split: len(items) for split, items in by_split.items()},
                            boxes=box_check_table(good, box_status, {it.relpath: it.bbox for it in listing.items
                                                                 if it.bbox is not None}))
    bar.close()
    return out_dir


def load_manifest(dataset_dir: Path | str) -> dict[str, Any]:
    """Read ``DIR/manifest.json`` (``dataset_dir`` may also be the manifest file itself)."""
    path = Path(dataset_dir)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (build the dataset with `mgmoe shards build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise DataError(f"{path}: not valid JSON ({exn})") from None
    for key in ("name", "classes", "counts", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: missing key {key!r}")
    return manifest
