"""``mgmoe eval``: accuracy, long-tail buckets, confusions, efficiency and routing of a trained model.

The backbone runs once per batch; every routing variant (the trained model's inference routing,
dense fusion, each single expert) is a ``forward_head`` on the same features, so the report
compares the routed ensemble with its parts on identical inputs. Writes ``report.json``,
``report.md``, ``predictions.jsonl``, ``routing_heatmap.png`` and ``tsne.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from mgmoe_ds.inference import InferenceMeta, load_trained
from mgmoe_ds.metrics import topk_correct

ROUTED = "routed"  # name of the trained model's inference routing pass
DENSE = "dense"  # every expert, router weights
MAX_TSNE_POINTS = 2000
POOL_FACTOR = 10  # the t-SNE sample is drawn from the first POOL_FACTOR * max_points images
TOP_CONFUSIONS = 10

HeadRouting = Callable[[Tensor], dict[str, Any]]  # pooled (B, D) -> forward_head routing kwargs


@dataclass
class PassResult:
    """One routing variant over the whole split."""

    logits: Tensor  # (N, classes) fp32
    weights: Tensor  # (N, E) routing weight of each expert per image (0 where not used)
    used: Tensor  # (N, E) bool: the image ran through the expert
    seconds: float = 0.0  # forward_head time


@dataclass
class SplitOutputs:
    """Every pass over one split, plus what the figures need."""

    labels: Tensor  # (N,)
    keys: list[str]
    passes: dict[str, PassResult]
    pooled_sample: Tensor  # (M, D) pooled backbone features of M <= max_points images
    sample_index: Tensor  # (M,) which images (rows of labels) those are
    backbone_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _per_expert(route, num_experts: int) -> tuple[Tensor, Tensor]:
    """(B, K) choices -> (B, E) weights and (B, E) bool used, over the kept choices."""
    indices, kept = route.expert_indices.cpu(), route.kept.cpu()  # (B, K)
    weights = torch.zeros(indices.shape[0], num_experts).scatter_add_(1, indices, (route.weights.float().cpu() * kept))
    used = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool).scatter_(1, indices, kept)
    return weights, used


@torch.no_grad()
def run_passes(model, loader, passes: dict[str, HeadRouting], *, max_points: int = MAX_TSNE_POINTS,
               desc: str = "eval", progress: bool = True, device: Optional[torch.device] = None) -> SplitOutputs:
    """Runs every routing variant in ``passes`` on each batch's backbone features.

    Args:
        model: an ``MGMoE`` with every expert (from ``load_trained``).
        loader: batches ``{"images", "labels", "keys"}``.
        passes: name -> routing kwargs for ``forward_head`` given the pooled features.
        max_points: pooled features kept for the embedding figure: a seeded random sample of
            the first ``POOL_FACTOR * max_points`` images (bounded memory on large splits).
        desc: progress bar label.
        progress: show a tqdm progress bar.
        device: where the images go (the model's device); default the CPU.
    """
    from tqdm.auto import tqdm

    model.eval()
    labels, keys, pooled_sample = [], [], []
    logits: dict[str, list[Tensor]] = {name: [] for name in passes}
    weights: dict[str, list[Tensor]] = {name: [] for name in passes}
    used: dict[str, list[Tensor]] = {name: [] for name in passes}
    seconds = {name: 0.0 for name in passes}
    backbone_seconds = 0.0
    kept_points = 0
    device = device or torch.device("cpu")

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the kernels, not their launch
        return time.perf_counter()

    for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        started = clock()
        features = model.forward_features(batch["images"].to(device, dtype=torch.float32))
        backbone_seconds += clock() - started
        pooled = features["pooled"]  # (B, D)
        for name, routing in passes.items():
            started = clock()
            out = model.forward_head(features, **routing(pooled))
            seconds[name] += clock() - started
            logits[name].append(out.logits.float().cpu())
            per_expert_weights, per_expert_used = _per_expert(out.route, model.num_experts)
            weights[name].append(per_expert_weights)
            used[name].append(per_expert_used)
        labels.append(batch["labels"].cpu())
        keys += list(batch["keys"])
        if kept_points < POOL_FACTOR * max_points:
            pooled_sample.append(pooled[:POOL_FACTOR * max_points - kept_points].float().cpu())
            kept_points += pooled_sample[-1].shape[0]
    if not labels:
        raise ValueError("the evaluation split has no images")
    pooled_all = torch.cat(pooled_sample) if pooled_sample else torch.zeros(0, model.backbone.info.pooled_dim)
    generator = torch.Generator().manual_seed(0)
    sample_index = torch.randperm(pooled_all.shape[0], generator=generator)[:max_points].sort().values  # (M,)
    results = {name: PassResult(torch.cat(logits[name]), torch.cat(weights[name]), torch.cat(used[name]), seconds[name])
               for name in passes}
    return SplitOutputs(torch.cat(labels), keys, results, pooled_all[sample_index], sample_index, backbone_seconds)


# ---------------------------------------------------------------------------------------------
# Accuracy


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


# ---------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_routing_heatmap(mean_weight: np.ndarray, expert_names: Sequence[str], class_names: Sequence[str],
                         path: Path) -> None:
    """(E, classes) mean routing weight per expert and category."""
    plt = _pyplot()
    width = min(24.0, 4.0 + 0.35 * len(class_names))
    show_names = len(class_names) <= 60
    label_room = 0.075 * max(map(len, class_names)) if show_names else 0.3  # rotated species names
    fig, ax = plt.subplots(figsize=(width, 1.5 + 0.45 * len(expert_names) + label_room))
    image = ax.imshow(mean_weight, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-6, float(mean_weight.max())))
    ax.set_yticks(range(len(expert_names)), expert_names)
    if show_names:
        ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_xlabel("species")
    ax.set_title("mean routing weight per expert and species")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(M, D) -> (M, 2) t-SNE (sklearn), perplexity capped for small M."""
    from sklearn.manifold import TSNE

    m = features.shape[0]
    if m < 3:
        return np.zeros((m, 2))
    perplexity = float(min(30.0, max(1.0, (m - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        features.astype(np.float32))


def plot_tsne(backbone: np.ndarray, fused: np.ndarray, labels: np.ndarray, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, points, title in zip(axes, (backbone, fused), ("backbone (pooled) features", "fused (routed) logits")):
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab20", s=6)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(np.unique(labels)) <= 20:
        axes[1].legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    fig.suptitle(f"t-SNE of {len(labels)} images, coloured by species")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class EvaluationArgs:
    """What ``eval`` and ``ablate`` both take."""

    checkpoint: Path  # a run folder or an exported .safetensors file
    data: Optional[str] = None  # dataset folder; default: the one the run trained on
    out: Optional[Path] = None  # output folder; default: next to the checkpoint
    split: str = "test"
    batch_size: int = 32
    num_workers: int = 0
    progress: bool = True
    device: Optional[str] = None  # default: "cuda" when available, else "cpu"


@dataclass
class EvalArgs(EvaluationArgs):
    head_min: Optional[float] = None  # long-tail bucket thresholds (training images per class)
    tail_max: Optional[float] = None
    max_points: int = MAX_TSNE_POINTS  # images in the t-SNE figure


def resolve_device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_out(checkpoint: Path, name: str) -> Path:
    """RUN/<name> for a run folder, else <file stem>_<name> next to an exported file."""
    checkpoint = Path(checkpoint)
    return checkpoint / name if checkpoint.is_dir() else checkpoint.with_name(f"{checkpoint.stem}_{name}")


def eval_loader(meta: InferenceMeta, data: Optional[str], split: str, batch_size: int, num_workers: int = 0):
    """The split's loader with the model's preprocessing, and the class counts of its train split."""
    from mgmoe_ds.data import make_loader, resolve_source

    source = data or meta.dataset
    if not source:
        raise ValueError(f"{meta.source}: no dataset recorded; pass --data")
    loader, info = make_loader(source, split, batch_size=batch_size, img_size=meta.preprocessing.img_size,
                               train=False, num_workers=num_workers, shuffle=False,
                               transform_options=meta.preprocessing.transform_options())
    if info.num_classes != meta.num_classes:
        raise ValueError(f"{source}: {info.num_classes} classes but the model {meta.source} has {meta.num_classes}")
    try:
        _, _, train_counts = resolve_source(source, "train")
    except ValueError:  # no train split: bucket by the evaluated split's own counts
        train_counts = info.class_counts
    return loader, info, list(train_counts)


@dataclass
class LoadedRun:
    """What ``eval`` and ``ablate`` both start from."""

    model: Any
    meta: InferenceMeta
    device: torch.device
    out_dir: Path
    loader: Any
    info: Any
    train_counts: list[int]


def load_for_evaluation(args: Any, default_name: str) -> LoadedRun:
    """Loads the model onto its device, makes the output folder and the split's loader.

    Args:
        args: ``EvalArgs`` or ``AblateArgs`` (checkpoint, device, out, data, split, batch_size,
            num_workers).
        default_name: the output folder's name when ``args.out`` is not given.
    """
    model, meta = load_trained(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    out_dir = Path(args.out) if args.out is not None else default_out(args.checkpoint, default_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader, info, train_counts = eval_loader(meta, args.data, args.split, args.batch_size, args.num_workers)
    return LoadedRun(model, meta, device, out_dir, loader, info, train_counts)


def routing_passes(model, meta: InferenceMeta) -> dict[str, HeadRouting]:
    """The trained routing, dense fusion, and each single expert."""
    num_experts = model.num_experts
    passes: dict[str, HeadRouting] = {
        ROUTED: lambda pooled: meta.routing.head_kwargs(pooled, num_experts),
        DENSE: lambda pooled: {"mode": "dense"},
    }
    for e, name in enumerate(model.expert_names):
        passes[f"expert {e}:{name}"] = lambda pooled, e=e: {"mode": "single", "single_expert": e}
    return passes


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
    mean_weight = torch.zeros(len(model.expert_names), meta.num_classes)  # (E, classes)
    class_n = torch.bincount(labels, minlength=meta.num_classes).float().clamp_min(1)  # (classes,)
    mean_weight.index_add_(1, labels, routed.weights.T)
    mean_weight /= class_n
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
        },
        "variants": {k: {kk: vv for kk, vv in v.items() if kk != "per_class_top1"} for k, v in variants.items()},
        "routed_beats": {"dense": variants[ROUTED]["top1"] > variants[DENSE]["top1"],
                         "best_single_expert": best_single is not None and variants[ROUTED]["top1"] > best_single},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    with open(out_dir / "predictions.jsonl", "w") as handle:
        top = torch.softmax(routed.logits, dim=-1).topk(min(5, meta.num_classes), dim=-1)  # (N, 5)
        for i, key in enumerate(outputs.keys):
            handle.write(json.dumps({"key": key, "label": int(labels[i]), "predicted": int(top.indices[i, 0]),
                                     "top5": top.indices[i].tolist(),
                                     "top5_probabilities": [round(float(p), 6) for p in top.values[i]]}) + "\n")
    plot_routing_heatmap(mean_weight.numpy(), expert_ids, names, out_dir / "routing_heatmap.png")
    sample = outputs.sample_index
    plot_tsne(tsne_embedding(outputs.pooled_sample.numpy()), tsne_embedding(routed.logits[sample].numpy()),
              labels[sample].numpy(), out_dir / "tsne.png")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


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
        f"Long-tail buckets by training images per class: tail <= {th['tail_max']:g}, head >= {th['head_min']:g}.",
        "",
        "| bucket | classes | images | top-1 % |",
        "|---|---:|---:|---:|",
    ]
    for name, b in acc["long_tail"]["buckets"].items():
        lines.append(f"| {name} | {b['classes']} | {b['images']} | {_pct(b['top1'])} |")
    lines += ["", "Most confused pairs:", "", "| true | predicted | count | rate % |", "|---|---|---:|---:|"]
    lines += [f"| {p['true']} | {p['predicted']} | {p['count']} | {_pct(p['rate'])} |" for p in acc["confused_pairs"]]
    lines += ["", "## The routed ensemble and its parts", "",
              "| variant | top-1 % | top-5 % | head % | medium % | tail % | GFLOPs/image |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in report["variants"].items():
        b = v["buckets"]
        lines.append(f"| {name} | {_pct(v['top1'])} | {_pct(v['top5'])} | {_pct(b['head']['top1'])} | "
                     f"{_pct(b['medium']['top1'])} | {_pct(b['tail']['top1'])} | {_gflops(v['flops_per_image'])} |")
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
    lines += ["", "![routing heatmap](routing_heatmap.png)", "", "![t-SNE](tsne.png)", "", "## Per-class accuracy", "",
              "| species | train images | bucket | top-1 % |", "|---|---:|---|---:|"]
    lines += [f"| {c['species']} | {c['train_images']} | {c['bucket']} | {_pct(c['top1'])} |" for c in acc["per_class"]]
    return "\n".join(lines) + "\n"
