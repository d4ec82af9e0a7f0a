"""Checking built shards against their manifest: checksums, sample counts and image decoding."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm
from webdataset import reraise_exception

from .formats import IMAGE_EXTENSIONS
from .shards import load_manifest, sha256_file
from .tar_reader import tar_samples
from .transforms import decode_image


def _shard_samples(path: Path) -> list[dict]:
    """Every sample of a shard, grouped exactly as the training pipeline groups them
    (``tar_samples``); an unreadable tar or a duplicate member raises."""
    return list(tar_samples([{"url": str(path)}], handler=reraise_exception))


def verify_dataset(dataset_dir: Path | str, progress: bool = True) -> list[str]:
    """Check every shard of a dataset; return the problems found (empty when all is well).

    Each shard must exist, match the manifest's sha256 and sample count, and every sample must
    have a ``cls``, a ``json`` and one image that decodes.

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
        for sample in samples:
            key = sample["__key__"]
            fields = {name: data for name, data in sample.items() if not name.startswith("__")}
            images = [ext for ext in fields if ext in IMAGE_EXTENSIONS]
            if len(images) != 1 or "cls" not in fields or "json" not in fields:
                problems.append(f"{path}: {key}: expected one image, cls and json, got {sorted(fields)}")
                continue
            try:
                decode_image(fields[images[0]], min_side=64)
            except Exception as exn:  # report every undecodable image, keep checking
                problems.append(f"{path}: {key}.{images[0]}: does not decode ({type(exn).__name__}: {exn})")
    return problems
