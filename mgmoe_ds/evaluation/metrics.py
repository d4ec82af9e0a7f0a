"""Accuracy (top-k, per class, long-tail buckets), confused pairs and FLOPs per routing variant."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from mgmoe_ds.metrics import topk_correct

TOP_CONFUSIONS = 10


def long_tail_buckets(train_counts: Sequence[int], head_min: Optional[float] = None,
                      tail_max: Optional[float] = None) -> tuple[list[str], dict[str, float]]:
    """Assigns each class to "head", "medium" or "tail" by its number of training images.

    Args:
        train_counts: training images per class.
        head_min: a class with at least this many is "head"; default the upper tertile of counts.
        tail_max: a class with at most this many is "tail" (checked first); default the lower tertile.

    Returns:
        ``(bucket per class, {"head_min": ..., "tail_max": ...})``.
    """
    counts = np.asarray(train_counts, dtype=np.float64)
    head_min = float(np.quantile(counts, 2 / 3)) if head_min is None else float(head_min)
    tail_max = float(np.quantile(counts, 1 / 3)) if tail_max is None else float(tail_max)
    buckets = ["tail" if c <= tail_max else "head" if c >= head_min else "medium" for c in counts]
    return buckets, {"head_min": head_min, "tail_max": tail_max}


def accuracy_summary(logits: Tensor, labels: Tensor, buckets: Sequence[str]) -> dict[str, Any]:
    """Top-1/top-5, per-class top-1, mean class accuracy and per-bucket top-1."""
    num_classes = logits.shape[1]
    top1, top5 = topk_correct(logits, labels, (1, 5))
    n = labels.numel()
    correct = (logits.argmax(-1) == labels).float()  # (N,)
    per_class_n = torch.bincount(labels, minlength=num_classes).float()  # (classes,)
    per_class_hits = torch.zeros(num_classes).index_add_(0, labels, correct)  # (classes,)
    per_class = [float(h / c) if c > 0 else None for h, c in zip(per_class_hits, per_class_n)]
    by_bucket = {}
    for bucket in ("head", "medium", "tail"):
        classes = [i for i, b in enumerate(buckets) if b == bucket]
        images = int(per_class_n[classes].sum()) if classes else 0
        hits = float(per_class_hits[classes].sum()) if classes else 0.0
        by_bucket[bucket] = {"classes": len(classes), "images": images,
                             "top1": hits / images if images else None}
    present = [a for a in per_class if a is not None]
    return {"images": n, "top1": top1 / n, "top5": top5 / n, "mean_class_top1": float(np.mean(present)),
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
