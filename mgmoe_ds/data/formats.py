"""Readers that turn a dataset on disk into a list of items: which file, which class, which split.

Three layouts are read: ``imagefolder`` (``SRC/<class>/*`` or ``SRC/{train,val,test}/<class>/*``),
``cub`` (the CUB-200-2011 text files) and ``csv`` (``path,label`` with optional ``split`` and
``x,y,w,h`` columns); images without a label go to the ``unlabelled`` split (:mod:`.unlabelled`),
and a CSV label column that is empty in some rows is refused. A reader only lists files; it never
opens an image, so any mistake in the layout (a missing label file, an unknown class, an empty
class) is reported, in one line, before a single shard is written. Files that are listed but are
not images are returned as ``skipped``. A box is listed as its numbers are written, NaN and
infinity included: whether it fits its image is checked when the shards are built
(:func:`mgmoe_ds.data.shards.check_images`), which drops a box that is not finite, has no positive
size or lies outside the image, and keeps the image.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
SPLIT_NAMES = ("train", "val", "test")  # the labelled splits
UNLABELLED_SPLIT = "unlabelled"  # images without a class (``--unlabelled``): no ``cls``, never trained on as labelled
CSV_ROWS_NAMED = 5  # rows an error names (the count is always exact)


class DataError(ValueError):
    """A user-caused data error; its message is one line naming the file, the key and the value."""


@dataclass(frozen=True)
class Item:
    path: Path  # absolute path of the image file
    relpath: str  # path relative to the dataset root, with "/" separators
    label: Optional[int]  # index into the dataset's class list; None in the unlabelled split
    split: str  # "train", "val", "test" or "unlabelled"
    bbox: Optional[tuple[float, float, float, float]] = None  # (x, y, w, h) in pixels, when known


@dataclass
class Listing:
    classes: list[str]  # class (species) names in index order
    items: list[Item]  # every candidate image, in sorted order
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} for files left out


def image_extension(path: Path | str) -> Optional[str]:
    """The lower-case image extension of ``path`` without the dot, or None if it is not an image."""
    ext = Path(path).suffix.lower().lstrip(".")
    return ext if ext in IMAGE_EXTENSIONS else None


def parse_split_fractions(text: str) -> dict[str, float]:
    """Parse ``"train=0.8,val=0.1,test=0.1"`` into fractions that sum to 1.

    Args:
        text: comma-separated ``split=fraction`` pairs; splits are train, val and test.

    Returns:
        A dict from split name to fraction.
    """
    fractions = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            fraction = float(value)
        except ValueError:
            raise DataError(f"--split: {part!r}: expected split=fraction, e.g. train=0.8,val=0.1,test=0.1") from None
        if name not in SPLIT_NAMES or not 0.0 <= fraction <= 1.0:
            raise DataError(f"--split: {part!r}: expected a split in {SPLIT_NAMES} and a fraction in [0, 1]")
        fractions[name] = fraction
    if abs(sum(fractions.values()) - 1.0) > 1e-6 or fractions.get("train", 0.0) <= 0.0:
        raise DataError(f"--split: {text!r}: fractions must sum to 1 and include train > 0")
    return fractions


def stratified_splits(labels: Sequence[int], fractions: dict[str, float], seed: int) -> list[str]:
    """Assign each item a split, per class, with a seeded shuffle.

    Every class keeps at least one training item; the other splits get ``round(n * fraction)``.

    Args:
        labels: the class index of each item, in a fixed (sorted) order.
        fractions: split name -> fraction, as from :func:`parse_split_fractions`.
        seed: the seed of the per-class shuffles.

    Returns:
        The split name of each item.
    """
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    splits = ["train"] * len(labels)
    for label, indices in sorted(by_class.items()):
        order = list(indices)
        random.Random(f"{seed}:{label}").shuffle(order)
        start = 0
        for name in ("val", "test"):
            take = min(round(len(order) * fractions.get(name, 0.0)), len(order) - 1 - start)
            for index in order[start : start + max(take, 0)]:
                splits[index] = name
            start += max(take, 0)
    return splits


VALIDATION_FRACTION = 0.1  # the share of each class's training images a build carves into "val" by default


def carve_validation(listing: Listing, fraction: float, seed: int, source: str) -> tuple[Listing, int]:
    """A validation split carved from the training items when the listing has none.

    Stratified and seeded: each class gives ``max(1, round(fraction * n))`` of its ``n`` training
    items (a seeded draw), and keeps at least one. The routing teacher and the cluster-level
    routing are fitted on validation images, which must not be test images.

    Args:
        listing: the source's listing (its items' splits as the source gives them).
        fraction: in (0, 0.5].
        seed: seeds each class's draw.
        source: the source path, for error messages.

    Returns:
        ``(listing, carved)``: the listing with the carved items in "val", and how many were
        carved (0 when the source already has a validation split: it is kept as it is).

    Raises:
        DataError: a fraction outside (0, 0.5], or a class with fewer than two training items,
            in one line naming the class and its count; raised before any shard is written.
    """
    if not 0.0 < fraction <= 0.5:
        raise DataError(f"--val-fraction = {fraction}: expected a fraction in (0, 0.5]")
    if any(item.split == "val" for item in listing.items):
        return listing, 0
    by_class: dict[int, list[int]] = {}
    for index, item in enumerate(listing.items):
        if item.split == "train":
            by_class.setdefault(item.label, []).append(index)
    carved: set[int] = set()
    for label, indices in sorted(by_class.items()):
        if len(indices) < 2:
            raise DataError(f"{source}: class {listing.classes[label]!r} has {len(indices)} training image(s): too "
                            f"few to give both a training and a validation image (use --no-val-split)")
        order = list(indices)
        random.Random(f"{seed}:val:{label}").shuffle(order)
        carved.update(order[:min(len(order) - 1, max(1, round(fraction * len(order))))])
    items = [Item(it.path, it.relpath, it.label, "val", it.bbox) if i in carved else it
             for i, it in enumerate(listing.items)]
    return Listing(listing.classes, items, listing.skipped), len(carved)


def read_class_file(path: Path) -> list[str]:
    """Read one class name per line (blank lines ignored); duplicates are an error."""
    if not path.is_file():
        raise DataError(f"{path}: class list not found")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate class name {duplicates[0]!r}")
    return names


def _check_nonempty(classes: list[str], items: list[Item], where: Path) -> None:
    counts = [0] * len(classes)
    for item in items:
        counts[item.label] += 1
    for name, count in zip(classes, counts):
        if count == 0:
            raise DataError(f"{where}: class {name!r} has no images")


def _assign_splits(items: list[Item], fractions: dict[str, float], seed: int) -> list[Item]:
    splits = stratified_splits([it.label for it in items], fractions, seed)
    return [Item(it.path, it.relpath, it.label, split, it.bbox) for it, split in zip(items, splits)]


def read_imagefolder(
    src: Path, fractions: dict[str, float], seed: int, classes: Optional[list[str]] = None
) -> Listing:
    """List ``SRC/<class>/*`` or ``SRC/{train,val,test}/<class>/*``.

    Args:
        src: the dataset root.
        fractions: split fractions, used only when there are no split folders.
        seed: seed of the stratified split.
        classes: the class list in index order; default: the sorted class folder names.

    Returns:
        The listing; files without an image extension are in ``skipped``.
    """
    if not src.is_dir():
        raise DataError(f"{src}: not a directory")
    split_dirs = [src / s for s in SPLIT_NAMES if (src / s).is_dir()]
    roots = [(d, d.name) for d in split_dirs] if split_dirs else [(src, None)]
    found = sorted({c.name for root, _ in roots for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")})
    if not found:
        raise DataError(f"{src}: no class folders found (expected SRC/<class>/* or SRC/train/<class>/*)")
    if classes is None:
        classes = found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"{src}: class folder {unknown[0]!r} is not in the class list")
    index = {name: i for i, name in enumerate(classes)}
    items, skipped = [], []
    for root, split in roots:
        for class_dir in sorted(c for c in root.iterdir() if c.is_dir() and c.name in index):
            for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
                relpath = path.relative_to(src).as_posix()
                if image_extension(path) is None:
                    skipped.append({"path": relpath, "reason": "not an image file extension"})
                    continue
                items.append(Item(path, relpath, index[class_dir.name], split or "train"))
    _check_nonempty(classes, items, src)
    if not split_dirs:
        items = _assign_splits(items, fractions, seed)
    return Listing(classes, items, skipped)


def _read_cub_table(path: Path, columns: int) -> dict[str, list[str]]:
    if not path.is_file():
        raise DataError(f"{path}: CUB label file not found")
    table = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < columns:
            raise DataError(f"{path}:{number}: expected {columns} fields, got {line!r}")
        table[fields[0]] = fields[1 : columns] if columns > 2 else [" ".join(fields[1:])]
    return table


def _box_numbers(fields: Sequence[str], where: str) -> tuple[float, float, float, float]:
    """``[x, y, w, h]`` as written -> floats; "nan" and "inf" parse (the build drops such a box),
    any other text is an error."""
    try:
        x, y, w, h = (float(v) for v in fields)
    except ValueError:
        raise DataError(f"{where}: bbox = {list(fields)}: expected numbers") from None
    return x, y, w, h


def cub_species_name(raw: str) -> str:
    """``"001.Black_footed_Albatross"`` -> ``"Black_footed_Albatross"``."""
    head, dot, tail = raw.partition(".")
    return tail if dot and head.isdigit() else raw


def read_cub(src: Path) -> Listing:
    """List a CUB-200-2011 folder with its official train/test split and bounding boxes.

    Args:
        src: the folder holding ``images.txt``, ``image_class_labels.txt``,
            ``train_test_split.txt``, ``classes.txt``, ``images/`` and, optionally,
            ``bounding_boxes.txt``.

    Returns:
        The listing; class names drop CUB's numeric prefix (``001.``).
    """
    images = _read_cub_table(src / "images.txt", 2)
    labels = _read_cub_table(src / "image_class_labels.txt", 2)
    is_train = _read_cub_table(src / "train_test_split.txt", 2)
    class_table = _read_cub_table(src / "classes.txt", 2)
    boxes_path = src / "bounding_boxes.txt"
    boxes = _read_cub_table(boxes_path, 5) if boxes_path.is_file() else {}
    class_ids = sorted(class_table, key=int)
    classes = [cub_species_name(class_table[c][0]) for c in class_ids]
    index = {c: i for i, c in enumerate(class_ids)}
    items = []
    for image_id in sorted(images, key=int):
        relpath = "images/" + images[image_id][0]
        if image_id not in labels:
            raise DataError(f"{src / 'image_class_labels.txt'}: no label for image id {image_id}")
        if labels[image_id][0] not in index:
            raise DataError(f"{src / 'image_class_labels.txt'}: image id {image_id}: unknown class id {labels[image_id][0]}")
        if image_id not in is_train:
            raise DataError(f"{src / 'train_test_split.txt'}: no split for image id {image_id}")
        box = _box_numbers(boxes[image_id], f"{boxes_path}: image id {image_id}") if image_id in boxes else None
        split = "train" if is_train[image_id][0] == "1" else "test"
        items.append(Item(src / relpath, relpath, index[labels[image_id][0]], split, box))
    _check_nonempty(classes, items, src / "image_class_labels.txt")
    return Listing(classes, items, [])


def read_csv(
    csv_path: Path, fractions: dict[str, float], seed: int, classes: Optional[list[str]] = None
) -> Listing:
    """List the rows of a CSV with columns ``path,label`` and optional ``split`` and ``x,y,w,h``.

    Paths are relative to the CSV's folder. Without a ``split`` column the split is stratified
    and seeded, as for an imagefolder without split folders. A row whose ``x,y,w,h`` are empty
    has no box; non-numeric text there is an error, while NaN or infinity is listed and dropped
    at build (the image is kept).

    Args:
        csv_path: the CSV file.
        fractions: split fractions when there is no ``split`` column.
        seed: seed of the stratified split.
        classes: the class list in index order; a label outside it is an error. Default: a
            ``classes.txt`` next to the CSV if there is one, else the sorted labels.

    Returns:
        The listing.
    """
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV file not found")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for needed in ("path", "label"):
            if needed not in columns:
                raise DataError(f"{csv_path}: missing column {needed!r} (columns: {','.join(columns)})")
        has_box = all(c in columns for c in ("x", "y", "w", "h"))
        rows = [(number, row) for number, row in enumerate(reader, 2)]
    empty = [number for number, row in rows if not (row["label"] or "").strip()]
    if empty and len(empty) == len(rows):
        raise DataError(f"{csv_path}: the label column is empty in every row: build these images as the unlabelled "
                        f"split of a labelled source (`mgmoe shards build SRC ... --unlabelled {csv_path}`)")
    if empty:
        raise partly_labelled_error(csv_path, empty, len(rows), "empty")
    if classes is None and (csv_path.parent / "classes.txt").is_file():
        classes = read_class_file(csv_path.parent / "classes.txt")
    if classes is None:
        classes = sorted({row["label"].strip() for _, row in rows})
    index = {name: i for i, name in enumerate(classes)}
    root = csv_path.parent
    items = []
    for number, row in rows:
        label = row["label"].strip()
        if label not in index:
            raise DataError(f"{csv_path}:{number}: label = {label!r}: not in the class list")
        split = (row.get("split") or "train").strip() if "split" in columns else "train"
        if split not in SPLIT_NAMES:
            raise DataError(f"{csv_path}:{number}: split = {split!r}: expected one of {SPLIT_NAMES}")
        box = None
        if has_box and all((row[c] or "").strip() for c in ("x", "y", "w", "h")):
            box = _box_numbers([row[c] for c in ("x", "y", "w", "h")], f"{csv_path}:{number}")
        relpath = Path(row["path"].strip()).as_posix()
        items.append(Item(root / relpath, relpath, index[label], split, box))
    items.sort(key=lambda it: it.relpath)
    _check_nonempty(classes, items, csv_path)
    if "split" not in columns:
        items = _assign_splits(items, fractions, seed)
    return Listing(classes, items, [])


def partly_labelled_error(csv_path: Path, rows: list[int], total: int, state: str) -> DataError:
    """The one-line error for a CSV whose label column is filled in some rows and ``state`` in ``rows``."""
    named = ", ".join(map(str, rows[:CSV_ROWS_NAMED])) + (f" and {len(rows) - CSV_ROWS_NAMED} more"
                                                         if len(rows) > CSV_ROWS_NAMED else "")
    return DataError(f"{csv_path}: the label column is {state} in {len(rows)} of {total} rows (lines {named}): split "
                     f"the file into a labelled CSV (the source, --format csv) and an unlabelled one with a path "
                     f"column and no labels (--unlabelled UNLABELLED.csv)")


# ``mgmoe shards build --format NAME``: one reader per source layout, each called as
# ``reader(src, fractions, seed, classes)``. A new layout is one reader function and one line here.
READERS = {
    "imagefolder": read_imagefolder,
    "cub": lambda src, fractions, seed, classes: read_cub(src),  # CUB's own split and class list
    "csv": read_csv,
}
FORMATS = tuple(READERS)


def read_listing(
    fmt: str, src: Path, fractions: dict[str, float], seed: int, classes: Optional[list[str]] = None
) -> Listing:
    """Dispatch to the reader for ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in READERS:
        raise DataError(f"--format = {fmt!r}: expected one of {', '.join(FORMATS)}")
    return READERS[fmt](src, fractions, seed, classes)
