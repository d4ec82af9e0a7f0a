"""Checking built shards against their manifest: checksums, sample counts and image decoding."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm
from webdataset import reraise_exception

from .formats import IMAGE_EXTENSIONS, UNLABELLED_SPLIT
from .shards import load_manifest, sha256_file
from .tar_reader import tar_samples
from .transforms import decode_image


def _shard_samples(path: Path) -> list[dict]:
    """Every sample of a shard, grouped exactly as the training pipeline groups them
    (``tar_samples``); an unreadable tar or a duplicate member raises."""
    return list(tar_samples([{"url": str(path)}], handler=reraise_exception))


def _unlabelled_json_problems(path: Path, key: str, data: bytes) -> list[str]:
    try:
        meta = json.loads(data)
    except ValueError as exn:
        return [f"{path}: {key}.json: not valid JSON ({exn})"]
    if not isinstance(meta, dict) or "label" not in meta or meta["label"] is not None:
        return [f"{path}: {key}.json: expected \"label\": null in the unlabelled split"]
    return []


def verify_dataset(dataset_dir: Path | str, progress: bool = True) -> list[str]:
    """Check every shard of a dataset; return the problems found (empty when all is well).

    Each shard must exist, match the manifest's sha256 and sample count (and its per-class
    counts, when the manifest has them: older ones do not), and every sample must have an
    integer ``cls``, a ``json`` and one image that decodes. A sample of the unlabelled split has no
    ``cls`` and its ``json`` says ``"label": null``.

    Args:
        dataset_dir: the dataset folder holding ``manifest.json``.
        progress: show a tqdm bar of shards done.

    Returns:
        One line per problem, each naming the shard.
    """
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    problems = []
    for shard in tqdm(manifest["shards"], desc=f"{manifest['name']}: verifying", unit="shard", disable=not progress):
        path = dataset_dir / shard["path"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            problems.append(f"{path}: sha256 {digest[:12]}... != manifest {shard['sha256'][:12]}...")
        try:
            samples = _shard_samples(path)
        except (ValueError, OSError) as exn:  # TarFormatError is a ValueError, as is a duplicate member
            problems.append(f"{path}: unreadable tar ({exn})")
            continue
        if len(samples) != shard["count"]:
            problems.append(f"{path}: {len(samples)} samples != manifest {shard['count']}")
        per_class: dict[str, int] = {}  # label index as in the manifest -> samples
        labelled = shard["split"] != UNLABELLED_SPLIT
        for sample in samples:
            key = sample["__key__"]
            fields = {name: data for name, data in sample.items() if not name.startswith("__")}
            images = [ext for ext in fields if ext in IMAGE_EXTENSIONS]
            if len(images) != 1 or ("cls" in fields) != labelled or "json" not in fields:
                expected = "one image, cls and json" if labelled else "one image and json, no cls (unlabelled)"
                problems.append(f"{path}: {key}: expected {expected}, got {sorted(fields)}")
                continue
            label = fields["cls"].decode("ascii", "replace").strip() if labelled else None
            if not labelled:
                problems += _unlabelled_json_problems(path, key, fields["json"])
            elif not label.isdigit():
                problems.append(f"{path}: {key}.cls = {label!r}: expected a class index")
            else:
                per_class[str(int(label))] = per_class.get(str(int(label)), 0) + 1
            try:
                decode_image(fields[images[0]], min_side=64)
            except Exception as exn:  # report every undecodable image, keep checking
                problems.append(f"{path}: {key}.{images[0]}: does not decode ({type(exn).__name__}: {exn})")
        expected = shard.get("per_class")  # absent from manifests written before it was added
        if expected is not None:
            wrong = [label for label in sorted(set(per_class) | set(expected), key=lambda k: (len(k), k))
                     if per_class.get(label, 0) != expected.get(label, 0)]
            if wrong:
                more = f" (and {len(wrong) - 1} more label(s))" if len(wrong) > 1 else ""
                problems.append(f"{path}: label {wrong[0]}: {per_class.get(wrong[0], 0)} samples != manifest "
                                f"per_class {expected.get(wrong[0], 0)}{more}")
    return problems
