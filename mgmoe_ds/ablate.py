"""``mgmoe ablate``: accuracy and FLOPs for K = 1..E and for every subset of experts, from one checkpoint.

Each row restricts or widens the trained router without retraining: "top-K" rows route every
image to its K best experts among all E; a subset row allows only the experts in the subset
(the router's softmax renormalised over them, via the ``allowed_experts`` mask) and fuses
``subset_k`` of them (default: all of the subset). The trained inference routing is the first
row for reference. All rows share one backbone pass per batch.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from mgmoe_ds.evaluation import (
    ROUTED,
    EvaluationArgs,
    accuracy_summary,
    load_for_evaluation,
    long_tail_buckets,
    pass_flops,
    router_flops,
    run_passes,
)
from mgmoe_ds.evaluation.specialisation import binomial_standard_error
from mgmoe_ds.moe.routing import RoutingRequest


@dataclass
class AblateArgs(EvaluationArgs):
    subset_k: Optional[int] = None  # K within a subset; None: every expert of the subset
    min_subset_size: int = 1  # 1: each expert alone too (the fixed subsets a Top-1 router must beat)


def ablation_rows(model, meta, subset_k: Optional[int] = None,
                  min_subset_size: int = 1) -> list[tuple[dict[str, Any], RoutingRequest]]:
    """(row description, routing) for the trained routing, K = 1..E, and each subset of size >= min."""
    num_experts = model.num_experts
    names = model.expert_names
    rows: list[tuple[dict[str, Any], RoutingRequest]] = [
        ({"row": ROUTED, "kind": "trained", "k": None, "experts": None}, meta.routing),
    ]
    for k in range(1, num_experts + 1):
        rows.append(({"row": f"top-{k}", "kind": "top_k", "k": k, "experts": list(names)},
                     RoutingRequest(top_k=k)))
    for size in range(max(1, min_subset_size), num_experts + 1):
        for subset in itertools.combinations(range(num_experts), size):
            mask = torch.zeros(num_experts, dtype=torch.bool)
            mask[list(subset)] = True
            k = size if subset_k is None else min(subset_k, size)
            label = "+".join(names[e] for e in subset)
            rows.append(({"row": f"{{{label}}} k={k}", "kind": "subset", "k": k, "experts": [names[e] for e in subset]},
                         RoutingRequest(top_k=k, allowed_experts=mask)))
    return rows


def ablate_model(args: AblateArgs) -> dict[str, Any]:
    """Runs ``mgmoe ablate``; writes ``ablation.json`` and ``ablation.md`` to ``args.out``."""
    run = load_for_evaluation(args, "ablation")
    model, meta, device, out_dir = run.model, run.meta, run.device, run.out_dir
    loader, train_counts = run.loader, run.train_counts
    rows = ablation_rows(model, meta, args.subset_k, args.min_subset_size)
    passes = {row["row"]: routing for row, routing in rows}
    outputs = run_passes(model, loader, passes, max_points=0, progress=args.progress, desc=f"ablate {args.split}",
                         device=device)
    buckets, thresholds = long_tail_buckets(train_counts)
    flops = model.compute_report(batch_size=2)["flops_per_image"]
    r_flops = router_flops(model)
    table = []
    for row, _ in rows:
        result = outputs.passes[row["row"]]
        summary = accuracy_summary(result.logits, outputs.labels, buckets)
        table.append({**row, "top1": summary["top1"], "top5": summary["top5"],
                      "mean_class_top1": summary["mean_class_top1"],
                      "tail_top1": summary["buckets"].get("tail", {}).get("top1"),
                      "flops_per_image": pass_flops(result.used, flops, r_flops),
                      "experts_per_image": float(result.used.sum(1).float().mean())})
    report = {"checkpoint": meta.source, "checkpoint_tag": meta.checkpoint_tag, "split": args.split,
              "images": int(outputs.labels.numel()), "routing_policy": meta.routing.to_json(),
              "long_tail_thresholds": thresholds, "backbone_flops_per_image": flops["backbone"],
              "expert_flops_per_image": flops["experts"], "rows": table}
    report["oracle_top1"] = oracle_top1(rows, outputs)
    report["verdict"] = verdict(table, report["images"], report["oracle_top1"])
    (out_dir / "ablation.json").write_text(json.dumps(report, indent=2))
    (out_dir / "ablation.md").write_text(render_markdown(report))
    return report


def oracle_top1(rows: list[tuple[dict[str, Any], RoutingRequest]], outputs) -> dict[int, float]:
    """Routing headroom, by subset size K: the top-1 of an oracle that picks, per image, any fixed
    subset of K experts that classifies it right (an upper bound for a router choosing K of these
    experts with these fusion weights; it sees the label, so it is a bound, never a model)."""
    labels = outputs.labels
    right: dict[int, Tensor] = {}
    for row, _ in rows:
        if row["kind"] == "subset" and row["k"] == len(row["experts"]):
            hit = outputs.passes[row["row"]].logits.argmax(1) == labels  # (N,)
            right[row["k"]] = right[row["k"]] | hit if row["k"] in right else hit
    return {k: float(hit.float().mean()) for k, hit in sorted(right.items())}


def compare(name: str, top1: float, other_name: str, other: float, images: int) -> str:
    """One sentence: ``name`` against ``other_name``, the gap in points and against one binomial standard error."""
    se = binomial_standard_error(other, images)
    gap = top1 - other
    if abs(gap) <= se:
        return f"{name} ({100 * top1:.2f}%) ties {other_name} ({100 * other:.2f}%): within one standard error ({100 * se:.2f})"
    word = "beats" if gap > 0 else "is below"
    return (f"{name} ({100 * top1:.2f}%) {word} {other_name} ({100 * other:.2f}%) by {100 * abs(gap):.2f} points, "
            f"more than one standard error ({100 * se:.2f})")


def verdict(rows: list[dict[str, Any]], images: int, oracle: Optional[dict[int, float]] = None) -> list[str]:
    """Does the router earn its place? The trained routing and the router's free Top-K against the
    best fixed subset of experts of the same size, in words; and how much any router could gain."""
    trained = next(r for r in rows if r["kind"] == "trained")
    k = round(trained["experts_per_image"])
    fixed = [r for r in rows if r["kind"] == "subset" and len(r["experts"]) == k]
    if not fixed:
        return [f"No fixed subset of {k} experts to compare with (the ablation's minimum subset size is larger)."]
    best = max(fixed, key=lambda r: r["top1"])
    best_name = f"the best fixed subset of {k}, {{{'+'.join(best['experts'])}}}"
    lines = [compare(f"The trained routing (about {k} expert(s) per image)", trained["top1"], best_name, best["top1"],
                     images) + "."]
    free = next((r for r in rows if r["kind"] == "top_k" and r["k"] == k), None)
    if free is not None:
        lines.append(compare(f"The router's free Top-{k}", free["top1"], best_name, best["top1"], images) + ".")
    beaten = sum(trained["top1"] > r["top1"] for r in fixed)
    lines.append(f"The trained routing beats {beaten} of the {len(fixed)} fixed subsets of {k}.")
    if oracle and k in oracle:
        lines.append(f"Headroom: an oracle picking, per image, a fixed subset of {k} that is right would reach "
                     f"{100 * oracle[k]:.2f}% ({100 * (oracle[k] - best['top1']):+.2f} points on the best fixed subset).")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    def pct(value: Optional[float]) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    lines = [f"# MG-MoE ablation: {report['split']} split ({report['images']} images)", "",
             "**Does the router earn its place?** " + " ".join(report["verdict"]), "",
             f"Checkpoint `{report['checkpoint']}` (tag `{report['checkpoint_tag']}`); trained routing: "
             f"{report['routing_policy']['kind']}. FLOPs = backbone + router + the experts each image used.", "",
             "| row | K | experts/image | top-1 % | top-5 % | mean class % | tail % | GFLOPs/image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['row']} | {r['k'] if r['k'] is not None else '-'} | {r['experts_per_image']:.2f} | "
                     f"{pct(r['top1'])} | {pct(r['top5'])} | {pct(r['mean_class_top1'])} | {pct(r['tail_top1'])} | "
                     f"{r['flops_per_image'] / 1e9:.4f} |")
    return "\n".join(lines) + "\n"
