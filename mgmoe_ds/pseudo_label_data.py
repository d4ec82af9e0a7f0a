"""``mgmoe pseudo-label``: a trained model's features, a pair network, and a pseudo-labelled dataset.

``pseudo_label_dataset`` computes the pooled backbone features of the dataset's ``train`` split
(labelled) and ``unlabelled`` split with the model's eval transform, trains a pair network on
the train features (:mod:`mgmoe_ds.pseudo_label`) and labels every unlabelled image. It writes
``--out``, a new dataset folder: every shard of the input copied as it is (train, val, test and
the unlabelled split), plus ``NAME-pseudo-train-NNNNNN.tar`` training shards holding the
unlabelled images scored at or above ``--threshold``, with their original bytes, ``cls`` the
pseudo-label and a ``json`` that carries ``{"pseudo": {"label", "score", "method"}}``
(:mod:`mgmoe_ds.data.pseudo`: ``data.pseudo_min_score`` decides which of them a run trains on).
The manifest counts them in ``train`` and says so under ``pseudo_label``; ``pseudo_label.json``
holds the per-class counts, the score histogram and, when the input has a ``val`` split, the
labeller's precision and coverage on it (its labels known) at a few thresholds; the histogram is
also drawn in ``pseudo_label_scores.png``. The folder is written beside ``--out`` and renamed
into place at the end, so a failed run leaves no half dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from mgmoe_ds.data import UNLABELLED_SPLIT, DataError, load_manifest
from mgmoe_ds.data.formats import IMAGE_EXTENSIONS
from mgmoe_ds.data.shards import MANIFEST_NAME, Sample, check_dataset_name, write_shards
from mgmoe_ds.data.stream import SkipCounter
from mgmoe_ds.data.tar_reader import tar_samples
from mgmoe_ds.pseudo_label import METHOD, precision_coverage, pseudo_labels, train_pair_network

STATS_NAME = "pseudo_label.json"
FIGURE_NAME = "pseudo_label_scores.png"
HISTOGRAM_BINS = 20  # equal bins over [0, 1]
VAL_THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9)  # where the val check reports precision (and at --threshold)


@dataclass
class PseudoLabelArgs:
    """What ``mgmoe pseudo-label`` takes."""

    model: Path  # a run folder or an exported .safetensors file
    data: Path  # the dataset folder, with a train and an unlabelled split
    out: Path  # the new dataset folder; its name is the new dataset's name
    threshold: float = 0.0  # pseudo-labels scored below it are not written (0: all)
    overwrite: bool = False  # replace an existing --out
    steps: int = 500  # pair network optimiser steps
    batch_pairs: int = 256  # pairs per step, half of them the same species
    lr: float = 1e-3  # pair network AdamW learning rate
    hidden: int = 128  # pair network hidden width
    embed: int = 64  # pair network embedding size
    feature_noise: float = 0.5  # Gaussian noise on the standardised training features (a regulariser)
    exemplars_per_class: int = 10  # labelled images per class each unlabelled image is compared with
    seed: int = 0  # seeds the pair network and its pairs
    batch_size: int = 32  # images per forward
    num_workers: int = 0  # DataLoader workers
    shard_size: Optional[int] = None  # most samples per pseudo-labelled shard; default: the input's largest train shard
    progress: bool = True  # tqdm bars
    device: Optional[str] = None  # where the model runs; default cuda when available


def check_request(args: PseudoLabelArgs) -> dict[str, Any]:
    """Everything about the request that can be checked before loading the model; returns the input manifest."""
    if not 0.0 <= args.threshold <= 1.0:
        raise DataError(f"--threshold = {args.threshold}: expected a score in [0, 1]")
    for flag, value in (("--steps", args.steps), ("--batch-pairs", args.batch_pairs),
                        ("--exemplars", args.exemplars_per_class), ("--batch-size", args.batch_size),
                        ("--shard-size", 1 if args.shard_size is None else args.shard_size)):
        if value < 1:
            raise DataError(f"{flag} = {value}: expected an integer >= 1")
    manifest = load_manifest(args.data)
    data = Path(args.data)
    if "pseudo_label" in manifest:
        raise DataError(f"{data}: already pseudo-labelled from {manifest['pseudo_label'].get('source')!r}: run "
                        f"`mgmoe pseudo-label` on that dataset instead (its unlabelled images would be added twice)")
    if not any(shard["split"] == UNLABELLED_SPLIT for shard in manifest["shards"]):
        raise DataError(f"{data}: no {UNLABELLED_SPLIT!r} split to pseudo-label: build it with "
                        f"`mgmoe shards build ... --unlabelled DIR`")
    out = Path(args.out)
    check_dataset_name(out.name)
    if data.resolve().is_relative_to(out.resolve()):
        raise DataError(f"--out {out}: holds the input dataset {data}; pass a new folder")
    if out.exists() and not args.overwrite:
        raise DataError(f"--out {out}: already exists; pass --overwrite to replace it")
    if out.exists() and not (out / MANIFEST_NAME).is_file():
        raise DataError(f"--out {out}: exists and is not a dataset folder (no {MANIFEST_NAME}); --overwrite replaces "
                        f"only a dataset")
    prefix = f"{out.name}-pseudo-"
    if any(shard["path"].startswith(prefix) for shard in manifest["shards"]):
        raise DataError(f"--out {out}: the input's shards already use the names {prefix}*: choose another name")
    return manifest


def check_classes(model_classes: list[str], manifest: dict[str, Any], model: Path, data: Path) -> None:
    """The model's classes must be the dataset's, in the same order (the pseudo-labels are its indices)."""
    classes = list(manifest["classes"])
    if model_classes == classes:
        return
    if len(model_classes) != len(classes):
        raise DataError(f"{model}: {len(model_classes)} classes but {data} has {len(classes)}: the model must be "
                        f"trained on that dataset's classes")
    index = next(i for i, (a, b) in enumerate(zip(model_classes, classes)) if a != b)
    raise DataError(f"{model}: class {index} is {model_classes[index]!r} but in {data} it is {classes[index]!r}: "
                    f"the model must be trained on that dataset's classes")


@torch.no_grad()
def pooled_features(model, meta, data: Path, split: str, *, batch_size: int, num_workers: int,
                    device: torch.device, progress: bool) -> tuple[Tensor, Tensor, list[str], int]:
    """The split's pooled backbone features under the model's eval transform.

    Returns:
        ``(features, labels, keys, skipped)``: (N, D) float32 on the CPU, (N,) labels (-1 in the
        unlabelled split), the sample keys and the samples the loader skipped as unreadable.
    """
    from tqdm.auto import tqdm

    from mgmoe_ds.evaluation.loading import eval_loader

    loader = eval_loader(meta, str(data), split, batch_size, num_workers)[0]
    features, labels, keys = [], [], []
    for batch in tqdm(loader, desc=f"features: {split}", total=len(loader), disable=not progress, dynamic_ncols=True):
        images = batch["images"].to(device, dtype=torch.float32)  # (B, 3, H, W)
        features.append(model.forward_features(images)["pooled"].float().cpu())  # (B, D)
        labels.append(batch["labels"])
        keys += list(batch["keys"])
    if not features:
        raise DataError(f"{data}: split {split!r}: no readable images")
    return torch.cat(features), torch.cat(labels), keys, loader.skipped


def _pseudo_samples(data: Path, manifest: dict[str, Any], chosen: dict[str, tuple[int, float]], name: str,
                    class_names: list[str], counter: SkipCounter) -> Iterator[Sample]:
    """The chosen unlabelled samples (key -> (label, score)) as pseudo-labelled training samples, in
    shard order, with their original image bytes and json (plus the pseudo record)."""
    urls = [{"url": str(data / shard["path"])} for shard in manifest["shards"] if shard["split"] == UNLABELLED_SPLIT]
    index = 0
    for sample in tar_samples(urls, handler=counter):
        if sample["__key__"] not in chosen:
            continue
        label, score = chosen[sample["__key__"]]
        ext = next(field for field in sample if field in IMAGE_EXTENSIONS)
        meta = json.loads(sample["json"])
        meta.pop("label", None)  # "label": null said the image had no class; now cls and pseudo say which
        meta.update(species=class_names[label], split="train", unlabelled_key=sample["__key__"],
                    pseudo={"label": label, "score": score, "method": METHOD})
        yield Sample(key=f"{name}_pseudo_{index:07d}", data=sample[ext], ext=ext, label=label, meta=meta)
        index += 1


def write_pseudo_dataset(data: Path, manifest: dict[str, Any], folder: Path, name: str,
                         chosen: dict[str, tuple[int, float]], shard_size: int, pseudo_label: dict[str, Any]
                         ) -> dict[str, Any]:
    """Copies every shard of ``data`` into ``folder`` and adds the pseudo-labelled training shards.

    Args:
        data: the input dataset folder.
        manifest: its manifest.
        folder: the (new, empty) output folder.
        name: the new dataset's name.
        chosen: the unlabelled samples to add, key -> (label, score).
        shard_size: the most samples per pseudo-labelled shard.
        pseudo_label: the manifest's ``pseudo_label`` entry (its ``pseudo_labelled`` count is set here).

    Returns:
        The new manifest (also written).
    """
    folder.mkdir(parents=True)
    for shard in manifest["shards"]:
        (folder / shard["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / shard["path"], folder / shard["path"])
    counter = SkipCounter()  # a shard the loader read moments ago: failing now is unlikely, but counted
    entries, labels, with_box = write_shards(
        _pseudo_samples(data, manifest, chosen, name, list(manifest["classes"]), counter), folder,
        f"{name}-pseudo", "train", shard_size, count=len(chosen))
    if counter.count:
        raise DataError(f"{data}: {counter.reasons[0]}")
    counts = json.loads(json.dumps(manifest["counts"]))  # a deep copy
    train = counts.setdefault("train", {"total": 0, "per_class": dict.fromkeys(manifest["classes"], 0)})
    train["total"] += len(labels)
    for label in labels:
        species = manifest["classes"][label]
        train["per_class"][species] = train["per_class"].get(species, 0) + 1
    boxes = json.loads(json.dumps(manifest.get("boxes", {})))
    if "train" in boxes:
        boxes["train"]["with_box"] += with_box
        boxes["train"]["without_box"] += len(labels) - with_box
    new = dict(manifest, name=name, counts=counts, shards=manifest["shards"] + entries, boxes=boxes,
               pseudo_label=dict(pseudo_label, pseudo_labelled=len(labels)))
    (folder / MANIFEST_NAME).write_text(json.dumps(new, indent=1) + "\n", encoding="utf-8")
    return new


def score_histogram(scores: Tensor) -> dict[str, list]:
    """``{"edges": [...], "counts": [...]}`` of the scores over HISTOGRAM_BINS equal bins of [0, 1]."""
    counts = torch.histc(scores.float(), bins=HISTOGRAM_BINS, min=0.0, max=1.0)  # (bins,)
    edges = torch.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


def plot_scores(scores: Tensor, threshold: float, path: Path) -> None:
    from mgmoe_ds.evaluation.figures import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores.numpy(), bins=HISTOGRAM_BINS, range=(0.0, 1.0), color="tab:blue")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"--threshold {threshold:g}")
    ax.set_xlabel("pseudo-label score p1 * (1 - p2) (best, runner-up class's mean pair score)")
    ax.set_ylabel("unlabelled images")
    ax.set_title(f"{len(scores)} unlabelled images, {int((scores >= threshold).sum())} written")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def per_class_table(class_names: list[str], train_labels: Tensor, pred: Tensor, scores: Tensor,
                    threshold: float) -> dict[str, dict[str, Any]]:
    """By class: its labelled train images, the unlabelled images labelled with it, those written and
    their mean score."""
    table = {}
    for label, species in enumerate(class_names):
        mine = pred == label  # (U,)
        kept = mine & (scores >= threshold)  # (U,)
        table[species] = {"labelled": int((train_labels == label).sum()), "predicted": int(mine.sum()),
                          "written": int(kept.sum()),
                          "mean_score": round(float(scores[kept].mean()), 4) if bool(kept.any()) else None}
    return table


def pseudo_label_dataset(args: PseudoLabelArgs) -> dict[str, Any]:
    """Runs ``mgmoe pseudo-label``; see the module docstring.

    Returns:
        What ``pseudo_label.json`` holds, plus ``"out"``: the dataset folder written.

    Raises:
        DataError: a one-line user error (threshold, input without an unlabelled split, the model's
            classes not the dataset's, an existing ``--out``, ...); InferenceError: the model.
    """
    from mgmoe_ds.evaluation.loading import resolve_device
    from mgmoe_ds.inference import load_trained

    data, out = Path(args.data), Path(args.out)
    manifest = check_request(args)
    model, meta = load_trained(args.model)
    check_classes(meta.class_names, manifest, args.model, data)
    device = resolve_device(args.device)
    model.to(device).eval()
    options = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device, progress=args.progress)

    # features, the pair network, the labels
    train_features, train_labels, _, _ = pooled_features(model, meta, data, "train", **options)
    unlabelled_features, _, keys, unreadable = pooled_features(model, meta, data, UNLABELLED_SPLIT, **options)
    network = train_pair_network(train_features, train_labels, steps=args.steps, batch_pairs=args.batch_pairs,
                                 lr=args.lr, seed=args.seed, hidden=args.hidden, embed=args.embed,
                                 feature_noise=args.feature_noise, progress=args.progress)
    label_options = dict(exemplars_per_class=args.exemplars_per_class, num_classes=len(meta.class_names))
    pred, scores = pseudo_labels(network, train_features, train_labels, unlabelled_features, **label_options)

    # how well it labels images whose species is known
    val_check = None
    if any(shard["split"] == "val" for shard in manifest["shards"]):
        val_features, val_labels, _, _ = pooled_features(model, meta, data, "val", **options)
        val_pred, val_scores = pseudo_labels(network, train_features, train_labels, val_features, **label_options)
        thresholds = sorted(set(VAL_THRESHOLDS) | {args.threshold})
        val_check = [row.to_json() for row in precision_coverage(val_pred, val_scores, val_labels, thresholds)]

    # the new dataset, written aside and moved into place
    chosen = {key: (label, score) for key, label, score in zip(keys, pred.tolist(), scores.tolist())
              if score >= args.threshold}
    train_shards = [shard["count"] for shard in manifest["shards"] if shard["split"] == "train"]
    shard_size = args.shard_size or max(train_shards, default=1000)
    pseudo_entry = {"source": str(data), "model": str(args.model), "method": METHOD, "threshold": args.threshold,
                    "unlabelled": len(keys), "details": STATS_NAME}
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_pseudo_dataset(data, manifest, partial, out.name, chosen, shard_size, pseudo_entry)
    stats = dict(pseudo_entry, pseudo_labelled=len(chosen), unreadable=unreadable,
                 per_class=per_class_table(meta.class_names, train_labels, pred, scores, args.threshold),
                 score_histogram=score_histogram(scores), val=val_check,
                 pair_network={key: value for key, value in asdict(args).items()
                               if key in ("steps", "batch_pairs", "lr", "hidden", "embed", "feature_noise",
                                          "exemplars_per_class", "seed")})
    (partial / STATS_NAME).write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    plot_scores(scores, args.threshold, partial / FIGURE_NAME)
    if out.exists():  # --overwrite, checked above to be a dataset folder
        shutil.rmtree(out)
    os.replace(partial, out)
    return dict(stats, out=str(out))


def summary_lines(stats: dict[str, Any]) -> list[str]:
    """What the command prints: a line per class, the totals and the val check."""
    lines = [f"  {species}: {row['written']} pseudo-labelled"
             + (f" (mean score {row['mean_score']:.3f})" if row["mean_score"] is not None else "")
             + f", {row['predicted'] - row['written']} below the threshold; {row['labelled']} labelled"
             for species, row in stats["per_class"].items()]
    lines.append(f"wrote {stats['out']}: {stats['pseudo_labelled']} of {stats['unlabelled']} unlabelled images "
                 f"pseudo-labelled at score >= {stats['threshold']:g}"
                 + (f" ({stats['unreadable']} unreadable, skipped)" if stats["unreadable"] else ""))
    for row in stats["val"] or []:
        precision = "-" if row["precision"] is None else f"{row['precision']:.3f}"
        lines.append(f"  val (labels known): score >= {row['threshold']:g}: precision {precision}, "
                     f"coverage {row['coverage']:.3f}")
    return lines
