"""``mgmoe predict``: top-5 species, the routed experts and (with a box tower) where the bird is,
for image files, one JSON line each; optionally each image cropped to its box.

Runs in one CPU process with no launcher and no process group. A file that cannot be read or
decoded gets a JSON line with an ``error`` and the others go on (the error policy is the
``on_error`` parameter: the CLI reports, a caller may raise instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from mgmoe_ds.inference import InferenceMeta, eval_transform, routed_forward

TOP_SPECIES = 5


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and every file under each folder (recursively, sorted); hidden files skipped."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            files.append(path)
    return files


@dataclass
class LoadedImage:
    path: Path
    pixels: torch.Tensor  # (3, H, W) the model's input
    decoded_size: tuple[int, int]  # (width, height) as decoded (a JPEG may decode at a reduced scale)
    full_size: tuple[int, int]  # (width, height) of the file's image


def _load_image(path: Path, transform: Any, min_side: int) -> LoadedImage:
    from mgmoe_ds.data.transforms import decode_image, image_size

    data = path.read_bytes()
    image = decode_image(data, min_side=min_side)
    return LoadedImage(path, transform(image), image.size, image_size(data))


def box_in_file_pixels(box: torch.Tensor, image: LoadedImage, transform: Any) -> list[float]:
    """A (4,) box on the model's input (fractions) -> ``[x1, y1, x2, y2]`` in the file's pixels."""
    from mgmoe_ds.data.boxes import decoded_scale

    decoded = transform.box_to_source(box[None], image.decoded_size)[0]  # (4,) pixels of the decoded image
    scale_x, scale_y = decoded_scale(image.full_size, image.decoded_size)  # file pixels -> decoded pixels
    return [float(decoded[0]) / scale_x, float(decoded[1]) / scale_y, float(decoded[2]) / scale_x,
            float(decoded[3]) / scale_y]


def write_crop(path: Path, corners: list[float], crops_dir: Path, taken: set[str]) -> Path:
    """Crops the file's full-size image to ``corners`` (pixels) into ``crops_dir``, as
    ``<file stem>.jpg`` (``<stem>-1.jpg``, ... when two inputs share a stem); returns the crop's path."""
    from PIL import Image

    name, suffix = path.stem, 0
    while f"{name}.jpg" in taken:
        suffix += 1
        name = f"{path.stem}-{suffix}"
    taken.add(f"{name}.jpg")
    with Image.open(path) as image:
        left, top = int(corners[0]), int(corners[1])
        right, bottom = max(left + 1, round(corners[2])), max(top + 1, round(corners[3]))
        crop = image.convert("RGB").crop((left, top, right, bottom))
    out = crops_dir / f"{name}.jpg"
    tmp = out.with_name(out.name + ".tmp")
    crop.save(tmp, format="JPEG", quality=95)
    tmp.replace(out)  # no half-written crop under the final name
    return out


def predict_files(model, meta: InferenceMeta, files: Iterable[Path], *, batch_size: int = 16,
                  on_error: Optional[Callable[[Path, BaseException], dict[str, Any]]] = None,
                  crops_dir: Optional[Path] = None) -> Iterator[dict[str, Any]]:
    """Yields one record per file, in order.

    Args:
        model: from ``load_trained``.
        meta: its ``InferenceMeta``.
        files: image files.
        batch_size: images per forward.
        on_error: maps an unreadable file and its exception to the record to yield; default a
            record ``{"file", "error"}``. It may raise to stop.
        crops_dir: with a box tower, write each image cropped to its box here (see ``write_crop``).

    Returns:
        Records ``{"file", "top5": [{"species", "index", "probability"}], "experts": [{"id",
        "name", "weight"}]}``; with a box tower also ``"box": {"x", "y", "w", "h"}`` in the file's
        pixels (the convention of the datasets' boxes), and ``"crop"`` with ``crops_dir``.
    """
    from mgmoe_ds.data.transforms import draft_size

    on_error = on_error or (lambda path, err: {"file": str(path), "error": f"{type(err).__name__}: {err}"})
    transform = eval_transform(meta.preprocessing)
    min_side = draft_size(meta.preprocessing.img_size, meta.preprocessing.crop_pct)
    pending: list[tuple[Path, Optional[LoadedImage], Optional[dict[str, Any]]]] = []
    if crops_dir is not None:
        if model.box_tower is None:
            raise ValueError(f"--crops {crops_dir}: the model {meta.source} has no box tower (train with "
                             f"mgmoe.model.tasks.bbox)")
        crops_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()

    def flush() -> Iterator[dict[str, Any]]:
        loaded = [image for _, image, _ in pending if image is not None]
        records: list[dict[str, Any]] = []
        if loaded:
            out = routed_forward(model, meta, torch.stack([image.pixels for image in loaded]))
            records = _records(out, meta, [image.path for image in loaded])
            for row, (image, record) in enumerate(zip(loaded, records)):
                if out.boxes is None:
                    continue
                corners = box_in_file_pixels(out.boxes[row].double(), image, transform)
                record["box"] = {"x": round(corners[0], 1), "y": round(corners[1], 1),
                                 "w": round(corners[2] - corners[0], 1), "h": round(corners[3] - corners[1], 1)}
                if crops_dir is not None:
                    record["crop"] = str(write_crop(image.path, corners, crops_dir, taken))
        results = iter(records)
        for path, image, error in pending:
            yield error if image is None else next(results)
        pending.clear()

    for path in files:
        try:
            pending.append((path, _load_image(path, transform, min_side), None))
        except Exception as err:  # any unreadable file: decoding errors come in many types
            pending.append((path, None, on_error(path, err)))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def _records(out, meta: InferenceMeta, paths: list[Path]) -> list[dict[str, Any]]:
    probs = torch.softmax(out.logits.float(), dim=-1)  # (B, classes)
    top = probs.topk(min(TOP_SPECIES, probs.shape[-1]), dim=-1)  # (B, 5)
    names = meta.config.model.experts
    records = []
    for row, path in enumerate(paths):
        kept = out.route.kept[row]  # (K,)
        experts = [{"id": int(e), "name": names[int(e)].name, "weight": round(float(w), 6)}
                   for e, w, k in zip(out.route.expert_indices[row], out.route.weights[row], kept) if bool(k)]
        records.append({
            "file": str(path),
            "top5": [{"species": meta.class_names[int(i)], "index": int(i), "probability": round(float(p), 6)}
                     for p, i in zip(top.values[row], top.indices[row])],
            "experts": experts,
        })
    return records
