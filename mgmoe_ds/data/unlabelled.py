"""Images without a label: ``mgmoe shards build SRC ... --unlabelled PATH``.

``PATH`` is a folder of images (flat or nested) or a CSV with a ``path`` column. Its images become
the ``unlabelled`` split of the dataset built from the labelled source ``SRC``: stored without a
``cls`` (their ``json`` says ``"label": null``), counted in the manifest, and never read by the
training, validation or test loaders (``make_loader(DIR, "unlabelled", ...)`` reads them, with
label -1). Images that carry a class are refused, in one line, with how to build them instead: a
folder of class folders, and a CSV with labels in some or all of its rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .formats import UNLABELLED_SPLIT, DataError, Item, Listing, image_extension, partly_labelled_error


def _read_unlabelled_folder(src: Path) -> tuple[list[Item], list[dict]]:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    images = [p for p in files if image_extension(p) is not None]
    if not images:
        raise DataError(f"--unlabelled {src}: no image files in the folder")
    nested = [p.relative_to(src).parts for p in images]
    folders = sorted({parts[0] for parts in nested if len(parts) > 1})
    if all(len(parts) > 1 for parts in nested) and len(folders) >= 2:
        raise DataError(f"--unlabelled {src}: every image is inside a sub-folder ({folders[0]!r}, {folders[1]!r}"
                        f"{', ...' if len(folders) > 2 else ''}): these look like class folders: build them as a "
                        f"labelled source (`mgmoe shards build {src} --format imagefolder`) or pass a folder of images")
    # Paths start with the folder's name, so that they do not read as the labelled source's.
    prefix = src.resolve().name
    items, skipped = [], []
    for path in files:
        relpath = f"{prefix}/{path.relative_to(src).as_posix()}"
        if image_extension(path) is None:
            skipped.append({"path": relpath, "reason": "not an image file extension"})
            continue
        items.append(Item(path, relpath, None, UNLABELLED_SPLIT))
    return items, skipped


def _read_unlabelled_csv(csv_path: Path) -> tuple[list[Item], list[dict]]:
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "path" not in columns:
            raise DataError(f"--unlabelled {csv_path}: missing column 'path' (columns: {','.join(columns)})")
        rows = [(number, row) for number, row in enumerate(reader, 2)]
    if not rows:
        raise DataError(f"--unlabelled {csv_path}: no rows")
    labelled = [number for number, row in rows if (row.get("label") or "").strip()]
    if labelled and len(labelled) == len(rows):
        raise DataError(f"--unlabelled {csv_path}: every row has a label: build it as the labelled source "
                        f"(`mgmoe shards build {csv_path} --format csv`)")
    if labelled:
        raise partly_labelled_error(csv_path, labelled, len(rows), "filled")
    for number, row in rows:
        if not (row["path"] or "").strip():
            raise DataError(f"--unlabelled {csv_path}:{number}: path is empty")
    paths = sorted({Path(row["path"].strip()).as_posix() for _, row in rows})
    return [Item(csv_path.parent / relpath, relpath, None, UNLABELLED_SPLIT) for relpath in paths], []


def read_unlabelled(src: Path) -> tuple[list[Item], list[dict]]:
    """List the images of ``--unlabelled SRC``: every image under a folder (nested or flat), or the
    ``path`` column of a CSV (relative to its folder; a ``label`` column must be empty in every row).

    A folder whose images all lie in first-level sub-folders, two or more of them, looks like an
    imagefolder of classes, and is refused: unlabelled images carry no class, not even a folder's.

    Args:
        src: the folder or the CSV file.

    Returns:
        ``(items, skipped)``: items in the unlabelled split with no label (a folder's relative paths
        start with its name), and ``{"path", "reason"}`` for files that are not images.
    """
    if src.is_dir():
        return _read_unlabelled_folder(src)
    if src.is_file():
        return _read_unlabelled_csv(src)
    raise DataError(f"--unlabelled {src}: no such folder or CSV file")


def with_unlabelled(listing: Listing, items: list[Item], skipped: list[dict]) -> Listing:
    """``listing`` with the unlabelled ``items`` (from :func:`read_unlabelled`) added."""
    return Listing(listing.classes, listing.items + items, listing.skipped + skipped)
