"""Accuracy (top-k, per class, long-tail buckets), confused pairs and FLOPs per routing variant."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from mgmoe_ds.metrics import topk_correct

TOP_CONFUSIONS = 10
BUCKETS = ("head", "medium", "tail")
BALANCED = "all"  # the one bucket of a set whose classes all have the same number of training images
CALIBRATION_BINS = 15


def long_tail_buckets(train_counts: Sequence[int], head_min: Optional[float] = None,
                      tail_max: Optional[float] = None) -> tuple[list[str], dict[str, Any]]:
    """Assigns each class to "head", "medium" or "tail" by its number of training images.

    The default thresholds are the tertiles of the class counts. When ties leave a bucket empty
    (many classes with the same count), the distinct count values are cut into three runs
    instead, so every bucket the counts can fill is filled (two distinct values fill head and
    tail only). A set whose classes all have the same count is balanced: one bucket, ``"all"``.

    Args:
        train_counts: training images per class.
        head_min: a class with at least this many is "head"; default as above.
        tail_max: a class with at most this many is "tail" (checked first); default as above.

    Returns:
        ``(bucket per class, {"head_min": ..., "tail_max": ..., "balanced": bool})``.
    """
    counts = np.asarray(train_counts, dtype=np.float64)
    distinct = np.unique(counts)  # sorted
    chosen = head_min is not None or tail_max is not None
    if not chosen and len(distinct) == 1:
        value = float(distinct[0])
        return [BALANCED] * len(counts), {"head_min": value, "tail_max": value, "balanced": True}

    def assign(tail: float, head: float) -> list[str]:
        return ["tail" if c <= tail else "head" if c >= head else "medium" for c in counts]

    tail_max = float(np.quantile(counts, 1 / 3)) if tail_max is None else float(tail_max)
    head_min = float(np.quantile(counts, 2 / 3)) if head_min is None else float(head_min)
    buckets = assign(tail_max, head_min)
    if not chosen and len(set(buckets)) < min(3, len(distinct)):  # ties emptied a bucket
        runs = np.array_split(distinct, 3) if len(distinct) >= 3 else [distinct[:1], [], distinct[1:]]
        tail_max, head_min = float(runs[0][-1]), float(runs[2][0])
        buckets = assign(tail_max, head_min)
    return buckets, {"head_min": head_min, "tail_max": tail_max, "balanced": False}


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = CALIBRATION_BINS) -> float:
    """ECE: the mean over equal-width confidence bins of |accuracy - confidence|, weighted by the
    bin's share of the images (confidence = the top softmax probability)."""
    if labels.numel() == 0:
        return 0.0
    confidence, predicted = torch.softmax(logits.float(), dim=-1).max(dim=-1)  # (N,), (N,)
    correct = (predicted == labels).float()  # (N,)
    which = torch.clamp((confidence * bins).long(), max=bins - 1)  # (N,) bin index
    gap = torch.zeros(bins).index_add_(0, which, correct - confidence)  # (bins,) sum of (acc - conf)
    return float(gap.abs().sum() / labels.numel())


def bucket_top1(class_images: Tensor, class_correct: Tensor, buckets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Top-1 over the images of each long-tail bucket's classes (``long_tail_buckets``).

    Args:
        class_images: (classes,) evaluated images per class.
        class_correct: (classes,) of those, how many were predicted right.
        buckets: each class's bucket.
    """
    by_bucket = {}
    for bucket in ([BALANCED] if BALANCED in buckets else BUCKETS):
        classes = [i for i, b in enumerate(buckets) if b == bucket]
        images = int(class_images[classes].sum()) if classes else 0
        hits = float(class_correct[classes].sum()) if classes else 0.0
        by_bucket[bucket] = {"classes": len(classes), "images": images, "top1": hits / images if images else None}
    return by_bucket


def accuracy_summary(logits: Tensor, labels: Tensor, buckets: Sequence[str]) -> dict[str, Any]:
    """Top-1/top-5, NLL, expected calibration error, per-class top-1, mean class accuracy and
    per-bucket top-1 (the buckets of ``long_tail_buckets``)."""
    num_classes = logits.shape[1]
    top1, top5 = topk_correct(logits, labels, (1, 5))
    n = labels.numel()
    correct = (logits.argmax(-1) == labels).float()  # (N,)
    per_class_n = torch.bincount(labels, minlength=num_classes).float()  # (classes,)
    per_class_hits = torch.zeros(num_classes).index_add_(0, labels, correct)  # (classes,)
    per_class = [float(h / c) if c > 0 else None for h, c in zip(per_class_hits, per_class_n)]
    by_bucket = bucket_top1(per_class_n, per_class_hits, buckets)
    present = [a for a in per_class if a is not None]
    nll = float(torch.nn.functional.cross_entropy(logits.float(), labels)) if n else 0.0
    return {"images": n, "top1": top1 / n, "top5": top5 / n, "nll": nll,
            "ece": expected_calibration_error(logits, labels), "mean_class_top1": float(np.mean(present)),
            "buckets": by_bucket, "per_class_top1": per_class}


def confused_pairs(logits: Tensor, labels: Tensor, class_names: Sequence[str], top: int = TOP_CONFUSIONS):
    """The most frequent (true, predicted) pairs with true != predicted, with their rate."""
    num_classes = logits.shape[1]
    predicted = logits.argmax(-1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes ** 2)
    confusion = confusion.reshape(num_classes, num_classes)  # (true, predicted)
    per_class = confusion.sum(1)
    off = confusion.clone()
    off.fill_diagonal_(0)
    order = torch.argsort(off.flatten(), descending=True)[:top]
    pairs = []
    for flat in order.tolist():
        true, pred = divmod(flat, num_classes)
        count = int(off[true, pred])
        if count == 0:
            break
        pairs.append({"true": class_names[true], "predicted": class_names[pred], "count": count,
                      "rate": count / max(1, int(per_class[true]))})
    return pairs


# ---------------------------------------------------------------------------------------------
# Efficiency


def pass_flops(used: Tensor, flops: dict[str, Any], router_flops: float) -> float:
    """FLOPs per image of a routing variant: backbone + router + the experts each image used.

    Args:
        used: (N, E) bool, the image ran through the expert.
        flops: ``MGMoE.compute_report()["flops_per_image"]`` (measured per module).
        router_flops: the router's FLOPs per image.
    """
    expert_flops = torch.tensor(list(flops["experts"].values()), dtype=torch.float64)  # (E,)
    share = used.double().mean(0)  # (E,) fraction of images sent to each expert
    return float(flops["backbone"] + router_flops + (share * expert_flops).sum())


def router_flops(model) -> float:
    gate = model.moe.router.gate.weight
    return 2.0 * gate.numel()  # one (D -> E) matmul per image
