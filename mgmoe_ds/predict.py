"""``mgmoe predict``: top-5 species and the routed experts for image files, one JSON line each.

Runs in one CPU process with no launcher and no process group. A file that cannot be read or
decoded gets a JSON line with an ``error`` and the others go on (the error policy is the
``on_error`` parameter: the CLI reports, a caller may raise instead).
"""

from __future__ import annotations

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


def _load_image(path: Path, transform: Callable, min_side: int) -> torch.Tensor:
    from mgmoe_ds.data import decode_image

    return transform(decode_image(path.read_bytes(), min_side=min_side))  # (3, H, W)


def predict_files(model, meta: InferenceMeta, files: Iterable[Path], *, batch_size: int = 16,
                  on_error: Optional[Callable[[Path, BaseException], dict[str, Any]]] = None) -> Iterator[dict[str, Any]]:
    """Yields one record per file, in order.

    Args:
        model: from ``load_trained``.
        meta: its ``InferenceMeta``.
        files: image files.
        batch_size: images per forward.
        on_error: maps an unreadable file and its exception to the record to yield; default a
            record ``{"file", "error"}``. It may raise to stop.

    Returns:
        Records ``{"file", "top5": [{"species", "index", "probability"}], "experts": [{"id",
        "name", "weight"}]}``.
    """
    from mgmoe_ds.data.transforms import draft_size

    on_error = on_error or (lambda path, err: {"file": str(path), "error": f"{type(err).__name__}: {err}"})
    transform = eval_transform(meta.preprocessing)
    min_side = draft_size(meta.preprocessing.img_size, meta.preprocessing.crop_pct)
    pending: list[tuple[Path, Optional[torch.Tensor], Optional[dict[str, Any]]]] = []

    def flush() -> Iterator[dict[str, Any]]:
        loaded = [(path, image) for path, image, _ in pending if image is not None]
        results: dict[Path, dict[str, Any]] = {}
        if loaded:
            out = routed_forward(model, meta, torch.stack([image for _, image in loaded]))
            results = dict(zip([p for p, _ in loaded], _records(out, meta, [p for p, _ in loaded])))
        for path, image, error in pending:
            yield error if image is None else results[path]
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
