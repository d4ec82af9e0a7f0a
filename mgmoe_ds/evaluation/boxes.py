"""The box task in ``mgmoe eval``: how well the tower finds the bird, and what the task did to top-1.

Box quality is the mean IoU of the tower's box with the true one and the share of images with IoU
>= 0.5, over the images of the split that have a true box, against the box that knows nothing of
the image: the split's own mean true box (a baseline that has seen the answers' average). What
the box task does to recognition needs a second model trained without it on the same budget
(``mgmoe eval --compare RUN``): both are scored on the same images, so the difference in top-1
carries the standard error of a paired difference, from the images on which they disagree.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from mgmoe_ds.box_tower import box_statistics
from mgmoe_ds.evaluation.specialisation import binomial_standard_error

IOU_HIT = 0.5  # an image counts as found when its IoU reaches this


def box_report(predicted: Tensor, true: Tensor, has_box: Tensor) -> Optional[dict[str, Any]]:
    """Mean IoU and IoU@0.5 of ``predicted`` (N, 4) against ``true`` (N, 4) over the ``has_box`` (N,)
    images, and the same for the split's mean true box; None when no image has a box."""
    has_box = has_box.bool()
    count = int(has_box.sum())
    if count == 0:
        return None
    found, iou_sum, hits = box_statistics(predicted, true, has_box).tolist()
    mean_box = true[has_box].float().mean(0, keepdim=True).expand_as(true)  # (N, 4)
    _, baseline_sum, baseline_hits = box_statistics(mean_box, true, has_box).tolist()
    return {
        "images_with_box": count,
        "mean_iou": iou_sum / found,
        "iou50": hits / found,
        "iou50_standard_error": binomial_standard_error(hits / found, count),
        "mean_box_baseline": {"box": [round(float(v), 4) for v in mean_box[0]], "mean_iou": baseline_sum / found,
                              "iou50": baseline_hits / found},
    }


def paired_comparison(this_correct: Tensor, other_correct: Tensor) -> dict[str, Any]:
    """Top-1 of two models on the same images, (N,) bool each: the difference and its standard error.

    The standard error of a paired difference of proportions: sqrt(b + c - (b - c)^2 / n) / n, with
    b and c the images only this model, or only the other, gets right. A difference within one
    standard error is a tie.
    """
    n = int(this_correct.numel())
    only_this = int((this_correct & ~other_correct).sum())
    only_other = int((other_correct & ~this_correct).sum())
    difference = (only_this - only_other) / max(1, n)
    variance = max(0.0, only_this + only_other - (only_this - only_other) ** 2 / max(1, n))
    standard_error = math.sqrt(variance) / max(1, n)
    return {"images": n, "top1": float(this_correct.float().mean()), "other_top1": float(other_correct.float().mean()),
            "difference": difference, "standard_error": standard_error, "only_this_right": only_this,
            "only_other_right": only_other, "tie": abs(difference) <= standard_error}


def comparison_sentence(comparison: dict[str, Any]) -> str:
    """The comparison in words, with the box task of each side."""
    boxes = {True: "with the box task", False: "without the box task"}
    this = f"this model ({boxes[comparison['box_task']['this']]}, {100 * comparison['top1']:.2f}%)"
    other = f"`{comparison['checkpoint']}` ({boxes[comparison['box_task']['other']]}, " \
            f"{100 * comparison['other_top1']:.2f}%)"
    gap, se = 100 * comparison["difference"], 100 * comparison["standard_error"]
    if comparison["tie"]:
        return f"Top-1: {this} ties {other}: {gap:+.2f} points, within one paired standard error ({se:.2f})."
    word = "beats" if gap > 0 else "is below"
    return f"Top-1: {this} {word} {other} by {abs(gap):.2f} points, more than one paired standard error ({se:.2f})."


def render_boxes(report: dict[str, Any]) -> list[str]:
    """Markdown lines of the box section and the comparison, when the report has them."""
    lines: list[str] = []
    boxes = report.get("boxes")
    if boxes:
        base = boxes["mean_box_baseline"]
        lines += ["", "## Where the bird is (box tower)", "",
                  f"Over the {boxes['images_with_box']} images with a true box: mean IoU "
                  f"**{boxes['mean_iou']:.3f}**, IoU >= {IOU_HIT:g} on **{100 * boxes['iou50']:.1f}%** "
                  f"(SE {100 * boxes['iou50_standard_error']:.1f}); the split's mean true box scores mean IoU "
                  f"{base['mean_iou']:.3f}, IoU >= {IOU_HIT:g} on {100 * base['iou50']:.1f}%."]
    comparison = report.get("compare")
    if comparison:
        lines += ["", "## Compared with another model", "", comparison_sentence(comparison)]
    return lines
