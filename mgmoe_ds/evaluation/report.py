"""``mgmoe eval``: accuracy, long-tail buckets, confusions, efficiency and routing of a trained model.

The backbone runs once per batch; every routing variant (the trained model's inference routing,
dense fusion, each single expert) is a ``forward_head`` on the same features, so the report
compares the routed ensemble with its parts on identical inputs. Writes ``report.json``,
``report.md``, ``predictions.jsonl``, ``routing_heatmap.png`` and ``tsne.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from mgmoe_ds.evaluation.boxes import box_report, paired_comparison, render_boxes
from mgmoe_ds.evaluation.backbone_moe import (
    backbone_moe_report,
    hard_masked_experts,
    plan_switch_off,
    render_backbone_moe,
    switch_off_top1,
)
from mgmoe_ds.evaluation.figures import plot_routing_share, plot_tsne, tsne_embedding
from mgmoe_ds.evaluation.loading import EvaluationArgs, device_name, eval_loader, load_for_evaluation
from mgmoe_ds.evaluation.metrics import accuracy_summary, confused_pairs, long_tail_buckets, pass_flops, router_flops
from mgmoe_ds.evaluation.passes import DENSE, MAX_TSNE_POINTS, ROUTED, routing_passes, run_passes
from mgmoe_ds.evaluation.specialisation import class_expert_share, layer_specialisation


@dataclass
class EvalArgs(EvaluationArgs):
    head_min: Optional[float] = None  # long-tail bucket thresholds (training images per class)
    tail_max: Optional[float] = None
    max_points: int = MAX_TSNE_POINTS  # images in the t-SNE figure
    compare: Optional[Path] = None  # another run folder or export: top-1 of both on the same images


def evaluate_model(args: EvalArgs) -> dict[str, Any]:
    """Runs ``mgmoe eval``; returns the report dict (also written to ``args.out``)."""
    run = load_for_evaluation(args, "eval")
    model, meta, device, out_dir = run.model, run.meta, run.device, run.out_dir
    loader, train_counts = run.loader, run.train_counts
    outputs = run_passes(model, loader, routing_passes(model, meta), max_points=args.max_points,
                         progress=args.progress, desc=f"eval {args.split}", device=device)
    buckets, thresholds = long_tail_buckets(train_counts, args.head_min, args.tail_max)
    labels = outputs.labels
    names = meta.class_names

    compute = model.compute_report(batch_size=2)
    flops = compute["flops_per_image"]
    r_flops = router_flops(model)
    variants = {}
    for name, result in outputs.passes.items():
        summary = accuracy_summary(result.logits, labels, buckets)
        summary["flops_per_image"] = pass_flops(result.used, flops, r_flops)
        variants[name] = summary
    routed = outputs.passes[ROUTED]
    n = labels.numel()
    routed_seconds = outputs.backbone_seconds + routed.seconds
    best_single = max((v["top1"] for k, v in variants.items() if k.startswith("expert ")), default=None)

    used = routed.used  # (N, E)
    share = class_expert_share(labels, routed.weights, meta.num_classes)  # (classes, E)
    class_images = torch.bincount(labels, minlength=meta.num_classes)  # (classes,)
    expert_ids = [f"{e}:{name}" for e, name in enumerate(model.expert_names)]
    report = {
        "checkpoint": meta.source,
        "checkpoint_tag": meta.checkpoint_tag,
        "final_stage": meta.final_stage,
        "dataset": str(args.data or meta.dataset),
        "split": args.split,
        "images": n,
        "routing_policy": meta.routing.to_json(),
        "accuracy": {
            "top1": variants[ROUTED]["top1"],
            "top5": variants[ROUTED]["top5"],
            "mean_class_top1": variants[ROUTED]["mean_class_top1"],
            "per_class": [{"species": names[c], "train_images": int(train_counts[c]), "bucket": buckets[c],
                           "top1": variants[ROUTED]["per_class_top1"][c]} for c in range(meta.num_classes)],
            "long_tail": {"thresholds": {**thresholds, "rule": "tail if train_images <= tail_max, else head if "
                                                               ">= head_min, else medium"},
                          "buckets": variants[ROUTED]["buckets"]},
            "confused_pairs": confused_pairs(routed.logits, labels, names),
        },
        "efficiency": {
            "flops_per_image": {"top_k": flops["top_k"], "dense": flops["dense"], "backbone": flops["backbone"],
                                "experts": flops["experts"], "routed_measured": variants[ROUTED]["flops_per_image"]},
            "parameters": compute["parameters"],
            "images_per_s": n / max(routed_seconds, 1e-9),
            "device": device_name(device),
            "torch_threads": torch.get_num_threads(),
        },
        "routing": {
            "utilisation": {eid: float(used[:, e].float().mean()) for e, eid in enumerate(expert_ids)},
            "mean_weight": {eid: float(routed.weights[:, e].mean()) for e, eid in enumerate(expert_ids)},
            "experts_per_image": float(used.sum(1).float().mean()),
            "heatmap": "routing_heatmap.png",
            "tsne": "tsne.png",
            "tsne_points": int(outputs.sample_index.numel()),
            "specialisation": layer_specialisation(share, class_images, names, expert_ids),
        },
        "variants": {k: {kk: vv for kk, vv in v.items() if kk != "per_class_top1"} for k, v in variants.items()},
        "routed_beats": {"dense": variants[ROUTED]["top1"] > variants[DENSE]["top1"],
                         "best_single_expert": best_single is not None and variants[ROUTED]["top1"] > best_single},
    }
    if outputs.boxes is not None:
        report["boxes"] = box_report(*outputs.boxes)
    if args.compare is not None:
        report["compare"] = compare_with(args, meta, outputs, device, box_task=model.box_tower is not None)
    if outputs.token_moe_mass:
        switched_off = switch_off_top1(model, loader, meta.routing, plan_switch_off(outputs.token_moe_mass),
                                       device=device, progress=args.progress)
        report["backbone_moe"] = backbone_moe_report(outputs.token_moe_mass, labels, names, variants[ROUTED]["top1"],
                                                     switched_off, out_dir, hard_masked_experts(model))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    with open(out_dir / "predictions.jsonl", "w") as handle:
        top = torch.softmax(routed.logits, dim=-1).topk(min(5, meta.num_classes), dim=-1)  # (N, 5)
        for i, key in enumerate(outputs.keys):
            record = {"key": key, "label": int(labels[i]), "predicted": int(top.indices[i, 0]),
                      "top5": top.indices[i].tolist(), "top5_probabilities": [round(float(p), 6) for p in top.values[i]]}
            if outputs.boxes is not None:  # (x1, y1, x2, y2) as fractions of the model's input image
                record["box"] = [round(float(v), 5) for v in outputs.boxes[0][i]]
            handle.write(json.dumps(record) + "\n")
    plot_routing_share(share.numpy(), names, expert_ids,
                       title="head router: share of each species' routing weight per expert",
                       path=out_dir / "routing_heatmap.png")
    sample = outputs.sample_index
    plot_tsne(tsne_embedding(outputs.pooled_sample.numpy()), tsne_embedding(routed.logits[sample].numpy()),
              labels[sample].numpy(), out_dir / "tsne.png")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def compare_with(args: EvalArgs, meta: Any, outputs: Any, device: torch.device, box_task: bool) -> dict[str, Any]:
    """Top-1 of ``args.compare``'s model against this one on the same images (matched by key)."""
    from mgmoe_ds.inference import load_trained

    other, other_meta = load_trained(args.compare)
    if other_meta.class_names != meta.class_names:
        raise ValueError(f"--compare {args.compare}: its {other_meta.num_classes} classes are not this model's "
                         f"{meta.num_classes} in the same order; compare models of one label space")
    other.to(device)
    loader, _, _ = eval_loader(other_meta, args.data or meta.dataset, args.split, args.batch_size, args.num_workers)
    theirs = run_passes(other, loader, {ROUTED: other_meta.routing}, max_points=0, progress=args.progress,
                        desc=f"eval {args.split} ({args.compare})", device=device)
    row = {key: i for i, key in enumerate(theirs.keys)}
    order = torch.tensor([row[key] for key in outputs.keys])  # (N,) their row of each of our images
    this_correct = outputs.passes[ROUTED].logits.argmax(1) == outputs.labels  # (N,)
    other_correct = theirs.passes[ROUTED].logits.argmax(1)[order] == theirs.labels[order]  # (N,)
    return {"checkpoint": str(args.compare), "box_task": {"this": box_task, "other": other.box_tower is not None},
            **paired_comparison(this_correct, other_correct)}


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _gflops(value: float) -> str:
    return f"{value / 1e9:.4f}"


def render_markdown(report: dict[str, Any]) -> str:
    acc, eff, routing = report["accuracy"], report["efficiency"], report["routing"]
    th = acc["long_tail"]["thresholds"]
    lines = [
        f"# MG-MoE evaluation: {report['split']} split ({report['images']} images)",
        "",
        f"Checkpoint `{report['checkpoint']}` (tag `{report['checkpoint_tag']}`, last stage "
        f"`{report['final_stage']}`), routing: {report['routing_policy']['kind']}.",
        "",
        "## Accuracy",
        "",
        f"Top-1 **{_pct(acc['top1'])}%**, top-5 {_pct(acc['top5'])}%, mean per-class top-1 "
        f"{_pct(acc['mean_class_top1'])}%.",
        "",
        ("The training set is balanced (every class has the same number of images): one bucket."
         if th.get("balanced") else
         f"Long-tail buckets by training images per class: tail <= {th['tail_max']:g}, head >= {th['head_min']:g}."),
        "",
        "| bucket | classes | images | top-1 % |",
        "|---|---:|---:|---:|",
    ]
    for name, b in acc["long_tail"]["buckets"].items():
        lines.append(f"| {name} | {b['classes']} | {b['images']} | {_pct(b['top1'])} |")
    lines += ["", "Most confused pairs:", "", "| true | predicted | count | rate % |", "|---|---|---:|---:|"]
    lines += [f"| {p['true']} | {p['predicted']} | {p['count']} | {_pct(p['rate'])} |" for p in acc["confused_pairs"]]
    buckets = list(acc["long_tail"]["buckets"])
    lines += ["", "## The routed ensemble and its parts", "",
              "NLL and ECE (expected calibration error, 15 bins): how well each variant's probabilities are "
              "calibrated on this split, each expert alone included.", "",
              "| variant | top-1 % | top-5 % | NLL | ECE | " + " | ".join(f"{b} %" for b in buckets) + " | GFLOPs/image |",
              "|---|---:|---:|---:|---:|" + "---:|" * len(buckets) + "---:|"]
    for name, v in report["variants"].items():
        per_bucket = " | ".join(_pct(v["buckets"][b]["top1"]) for b in buckets)
        lines.append(f"| {name} | {_pct(v['top1'])} | {_pct(v['top5'])} | {v['nll']:.3f} | {v['ece']:.3f} | "
                     f"{per_bucket} | {_gflops(v['flops_per_image'])} |")
    lines += ["", f"Routed beats dense fusion: {report['routed_beats']['dense']}; beats the best single expert: "
                  f"{report['routed_beats']['best_single_expert']}.", "", "## Efficiency", ""]
    f, p = eff["flops_per_image"], eff["parameters"]
    lines += [f"- GFLOPs per image: top-k {_gflops(f['top_k'])}, dense {_gflops(f['dense'])}, backbone "
              f"{_gflops(f['backbone'])}",
              f"- parameters: total {p['total']:,}, active per image {p['active_per_image']:,.0f}",
              f"- throughput: {eff['images_per_s']:.1f} images/s on {eff['device']} "
              f"({eff['torch_threads']} threads, routed forward only)", "", "## Routing", "",
              "| expert | utilisation % | mean weight |", "|---|---:|---:|"]
    for eid, share in routing["utilisation"].items():
        lines.append(f"| {eid} | {_pct(share)} | {routing['mean_weight'][eid]:.3f} |")
    specialisation = routing.get("specialisation")
    if specialisation:
        entropy = specialisation["class_expert_entropy"]
        lines += ["", f"What each expert learned (head router; class-expert entropy {entropy['normalised']:.2f} of "
                      f"its maximum, mutual information {specialisation['mutual_information']:.3f} of at most "
                      f"{specialisation['max_mutual_information']:.3f} nats):", ""]
        lines += [f"- {sentence}" for sentence in specialisation["summary"]]
    lines += ["", "![routing heatmap](routing_heatmap.png)", "", "![t-SNE](tsne.png)"]
    lines += render_boxes(report)
    lines += render_backbone_moe(report.get("backbone_moe", {}))
    lines += ["", "## Per-class accuracy", "",
              "| species | train images | bucket | top-1 % |", "|---|---:|---|---:|"]
    lines += [f"| {c['species']} | {c['train_images']} | {c['bucket']} | {_pct(c['top1'])} |" for c in acc["per_class"]]
    return "\n".join(lines) + "\n"
