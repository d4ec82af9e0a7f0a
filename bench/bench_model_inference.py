"""Issue 3 benchmark: Top-2 routed inference vs dense (all four experts) on the same MG-MoE model.

For each model below, in eval mode under ``torch.no_grad()`` with ``moe.dropless = True`` (so no
Top-2 choice is ever dropped for capacity), on one batch of random images:

* FLOPs per image (PyTorch's FlopCounterMode via ``MGMoE.compute_report``: matmuls, convolutions
  and attention; 2 FLOPs per multiply-add) of the backbone, each expert (and its ratio to the
  backbone), Top-2 and dense;
* images/s of Top-2 and of dense inference: ``--warmup`` untimed batches per mode, then
  ``--repeats`` rounds, each timing one batch of every mode (and the backbone and each expert
  alone on the batch) in a rotating order (so a slow phase of a shared machine hits all of
  them); the median over rounds is reported, with the ratio of the medians and the median of
  the per-round ratios.

Three modes are timed on the same model and batch:

* ``top2``: the model's own router. The models are untrained, so the router's choice is
  arbitrary and unbalanced (random images tend to send every image to the same pair, printed
  below), but every image still runs exactly 2 experts;
* ``top2_balanced``: image i may use only the i-th of the 6 expert pairs in turn (the
  ``allowed_experts`` mask), which is the load a trained, load-balanced router gives: every expert
  sees half the images;
* ``dense``: every image runs all four experts.

Models:

1. ``experts_dominate``: a light backbone (``tf_efficientnet_lite0`` at 96 px, 0.14 GFLOPs) with
   widened experts whose measured time on the whole batch sums to more than 3x the backbone's
   (the script prints the ratio and fails if it is not). Time, not FLOPs, decides whether the
   experts dominate: the backbone's depthwise convolutions run far below the matmul rate, so an
   expert set with 5x the backbone's FLOPs can cost less than 2x its time. A ViT backbone cannot make all four experts heavy: on a ViT, TransFG runs
   one block on the 1 + H tokens it selects (about 0.3% of the backbone), while on a CNN its
   substitute attends over all final tokens.
2. ``shipped_demo``: exactly the model block of ``ds_configs/zero2.json`` (with
   ``pretrained = null``: weights do not change the speed) and ``moe.dropless = true``.

Usage::

    PYTHONPATH=. python bench/bench_model_inference.py                  # CPU, all cores
    PYTHONPATH=. python bench/bench_model_inference.py --repeats 1 --batch-size 4 --warmup 1   # smoke
    PYTHONPATH=. python bench/bench_model_inference.py --device cuda    # one GPU

Writes ``bench/results/model_inference_<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SHIPPED_CONFIG = ROOT / "ds_configs" / "zero2.json"
NUM_CLASSES = 200  # CUB-200; the heads' size barely changes the cost
FLOP_BATCH = 12  # images for the FLOP counts: a multiple of the 6 expert pairs
TARGET_SPEEDUP = 1.6  # issue 3: Top-2 >= 1.6x dense throughput when the experts dominate
MIN_EXPERT_TO_BACKBONE = 3.0  # "the experts dominate": sum of expert times >= 3x the backbone's
MODES = ("top2", "top2_balanced", "dense")

EXPERTS_DOMINATE = {
    "backbone": "tf_efficientnet_lite0",
    "pretrained": None,
    "img_size": 96,
    "experts": [
        {"name": "mpsa", "options": {"dim": 4096, "num_parts": [64, 32, 32, 16]}},
        {"name": "pmg", "options": {"mid_channels": 640, "out_channels": 640, "hidden": 640}},
        {"name": "transfg", "options": {"dim": 1536, "num_queries": 16}},
        {"name": "pim", "options": {"dim": 640}},
    ],
}


def model_blocks() -> dict[str, dict]:
    """The two benchmarked ``mgmoe`` blocks (model and moe sections only), by name."""
    shipped = json.loads(SHIPPED_CONFIG.read_text())["mgmoe"]
    shipped_model = dict(copy.deepcopy(shipped["model"]), pretrained=None)
    shipped_moe = dict(shipped["moe"], dropless=True)
    return {
        "experts_dominate": {"model": EXPERTS_DOMINATE, "moe": dict(shipped_moe)},
        "shipped_demo": {"model": shipped_model, "moe": shipped_moe},
    }


def build_model(block: dict, device: str):
    from mgmoe_ds.config import config_from_dict
    from mgmoe_ds.model import MGMoE

    config = config_from_dict(block, source="bench_model_inference.py")
    return MGMoE(config.model, config.moe, NUM_CLASSES).to(device).eval()


def expert_pairs(num_experts: int) -> list[tuple[int, int]]:
    """All expert pairs; for an even count in round-robin order, so every E/2 consecutive pairs use
    each expert exactly once (any batch of a multiple of E/2 images loads every expert equally)."""
    if num_experts % 2:
        return list(itertools.combinations(range(num_experts), 2))
    players, pairs = list(range(num_experts)), []
    for _ in range(num_experts - 1):
        pairs += [tuple(sorted((players[i], players[-1 - i]))) for i in range(num_experts // 2)]
        players = [players[0], players[-1], *players[1:-1]]
    return pairs


def balanced_mask(batch_size: int, num_experts: int, device: str):
    """(B, E) bool: image i may use only the (i mod P)-th of the P expert pairs."""
    import torch

    pairs = expert_pairs(num_experts)
    mask = torch.zeros(batch_size, num_experts, dtype=torch.bool)
    for i in range(batch_size):
        mask[i, list(pairs[i % len(pairs)])] = True
    return mask.to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def measure(name: str, block: dict, args) -> dict:
    """FLOPs, routing and images/s of one model; see the module docstring."""
    import torch

    from mgmoe_ds.flops import count_flops
    from mgmoe_ds.moe.routing import RoutingRequest

    model = build_model(block, args.device)
    size = model.model_config.img_size
    num_experts = model.num_experts
    report = model.compute_report(batch_size=FLOP_BATCH)
    flops = report["flops_per_image"]
    backbone = flops["backbone"]
    generator = torch.Generator().manual_seed(0)
    flop_images = torch.randn(FLOP_BATCH, 3, size, size, generator=generator).to(args.device)
    balanced = RoutingRequest(allowed_experts=balanced_mask(FLOP_BATCH, num_experts, args.device))
    balanced_flops = count_flops(partial(model.forward, routing=balanced), flop_images) / FLOP_BATCH
    expert_sum = sum(flops["experts"].values())

    images = torch.randn(args.batch_size, 3, size, size, generator=generator).to(args.device)
    routing = {
        "top2": RoutingRequest(),
        "top2_balanced": RoutingRequest(allowed_experts=balanced_mask(args.batch_size, num_experts, args.device)),
        "dense": RoutingRequest.dense(),
    }
    with torch.no_grad():
        route = {}
        for mode in ("top2", "top2_balanced"):
            out = model(images, routing=routing[mode]).route
            route[mode] = {
                "images_per_expert": torch.bincount(out.expert_indices[out.kept], minlength=num_experts).tolist(),
                "experts_per_image": sorted(set(out.kept.sum(dim=1).tolist())),
            }
        calls = {mode: partial(model, images, routing=routing[mode]) for mode in MODES}
        components = component_calls(model, images)
        calls.update(components)
        for _ in range(args.warmup):
            for call in calls.values():
                call()
        order = list(calls)
        seconds = {timed: [] for timed in order}
        for round_index in range(args.repeats):
            shift = round_index % len(order)
            for timed in order[shift:] + order[:shift]:
                _sync(args.device)
                start = time.perf_counter()
                calls[timed]()
                _sync(args.device)
                seconds[timed].append(time.perf_counter() - start)
    component_seconds = {timed: statistics.median(seconds.pop(timed)) for timed in components}
    backbone_seconds = component_seconds.pop("backbone")
    expert_time_ratio = {k: v / backbone_seconds for k, v in component_seconds.items()}
    images_per_s = {mode: args.batch_size / statistics.median(values) for mode, values in seconds.items()}
    per_round = {mode: [d / t for d, t in zip(seconds["dense"], seconds[mode])] for mode in ("top2", "top2_balanced")}
    result = {
        "name": name,
        "model_block": block,
        "img_size": size,
        "flops_per_image": {
            "backbone": backbone,
            "experts": flops["experts"],
            "experts_to_backbone": {k: v / backbone for k, v in flops["experts"].items()},
            "experts_sum_to_backbone": expert_sum / backbone,
            "top2": flops["top_k"],
            "top2_balanced": balanced_flops,
            "dense": flops["dense"],
        },
        "flops_ratio_dense_to": {"top2": flops["dense"] / flops["top_k"], "top2_balanced": flops["dense"] / balanced_flops},
        "seconds_per_batch_components": {"backbone": backbone_seconds, "experts": component_seconds},
        "experts_time_to_backbone": expert_time_ratio,
        "experts_sum_time_to_backbone": sum(expert_time_ratio.values()),
        "parameters": report["parameters"],
        "routing": route,
        "seconds_per_batch": seconds,
        "images_per_s": images_per_s,
        "throughput_ratio_to_dense": {m: images_per_s[m] / images_per_s["dense"] for m in ("top2", "top2_balanced")},
        "median_round_ratio_to_dense": {m: statistics.median(v) for m, v in per_round.items()},
    }
    print(f"  {name}: experts/backbone FLOPs {expert_sum / backbone:.2f}, time "
          f"{result['experts_sum_time_to_backbone']:.2f}; images/s "
          + ", ".join(f"{m} {v:.1f}" for m, v in images_per_s.items()), flush=True)
    return result


def component_calls(model, images) -> dict:
    """The backbone and each expert alone on the whole batch's features, by name, as callables."""
    features = model.forward_features(images)
    calls = {"backbone": partial(model.forward_features, images)}
    for global_id, expert in zip(model.moe.global_expert_ids, model.moe.local_experts):
        payload = {key: features[key] for key in expert.required_features}
        calls[f"{global_id}:{model.expert_names[global_id]}"] = partial(expert, payload, None)
    return calls


def machine_info(device: str, threads: int) -> dict:
    import torch

    cpu = cpu_name()
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "loadavg_start": os.getloadavg()}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def gflops(value: float) -> str:
    return f"{value / 1e9:.3f}"


def render(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    where = (f"GPU {m['gpu']} (CUDA {m['cuda']})" if s["device"] == "cuda"
             else f"CPU {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads)")
    lines = [
        f"Command: {results['command']}",
        f"Machine: {where}; torch {m['torch']}, Python {m['python']}; load average {m['loadavg_start'][0]:.2f} at "
        f"start, {m['loadavg_end'][0]:.2f} at end.",
        f"Method: eval, torch.no_grad(), fp32, moe.dropless=true, batch {s['batch_size']} random images, "
        f"{s['warmup']} warm-up batch(es) per mode, then {s['repeats']} rounds timing one batch of each mode in "
        "rotating order" + (" with torch.cuda.synchronize() around each" if s["device"] == "cuda" else "")
        + "; images/s = batch / median seconds per batch. FLOPs: PyTorch FlopCounterMode (matmul, conv, attention; "
        f"2 per multiply-add) on {FLOP_BATCH} images.",
        "Routing: the models are untrained, so the router's Top-2 choice is arbitrary and unbalanced "
        "(images per expert below), but with dropless routing every image runs exactly 2 experts. top2_balanced "
        "restricts image i to the (i mod 6)-th expert pair (round-robin order): every expert sees half the images, as under a trained, "
        "load-balanced router.",
        "",
        "| model | backbone GFLOPs | expert GFLOPs (x backbone) | expert FLOPs / backbone | expert time / backbone "
        "(each; sum) | top-2 GFLOPs (balanced) | "
        "dense GFLOPs | FLOPs dense/top-2 (balanced) | images/s top-2 (balanced) | images/s dense | "
        "throughput top-2/dense (balanced) |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["models"]:
        f, ips = r["flops_per_image"], r["images_per_s"]
        experts = ", ".join(f"{k.split(':', 1)[1]} {gflops(v)} ({f['experts_to_backbone'][k]:.2f}x)"
                            for k, v in f["experts"].items())
        times = ", ".join(f"{k.split(':', 1)[1]} {v:.2f}x" for k, v in r["experts_time_to_backbone"].items())
        lines.append(
            f"| {r['name']} | {gflops(f['backbone'])} | {experts} | {f['experts_sum_to_backbone']:.2f}x | "
            f"{times}; **{r['experts_sum_time_to_backbone']:.2f}x** | "
            f"{gflops(f['top2'])} ({gflops(f['top2_balanced'])}) | {gflops(f['dense'])} | "
            f"{r['flops_ratio_dense_to']['top2']:.2f} ({r['flops_ratio_dense_to']['top2_balanced']:.2f}) | "
            f"{ips['top2']:.1f} ({ips['top2_balanced']:.1f}) | {ips['dense']:.1f} | "
            f"**{r['throughput_ratio_to_dense']['top2']:.2f}** ({r['throughput_ratio_to_dense']['top2_balanced']:.2f}) |")
    lines.append("")
    for r in results["models"]:
        lines.append(f"{r['name']}: images per expert (of {results['settings']['batch_size']} images x 2 choices) "
                     f"top2 {r['routing']['top2']['images_per_expert']}, top2_balanced "
                     f"{r['routing']['top2_balanced']['images_per_expert']}; experts per image "
                     f"{r['routing']['top2']['experts_per_image']}; median per-round dense/top-2 time ratio "
                     f"{r['median_round_ratio_to_dense']['top2']:.2f} "
                     f"(balanced {r['median_round_ratio_to_dense']['top2_balanced']:.2f}).")
    for r in results["models"]:
        if r["name"] != "experts_dominate":
            continue
        ratio = r["throughput_ratio_to_dense"]
        verdict = {m: "met" if v >= TARGET_SPEEDUP else "not met" for m, v in ratio.items()}
        lines.append(f"\nTarget (experts dominate, Top-2 >= {TARGET_SPEEDUP}x dense images/s): "
                     f"{verdict['top2']} with the model's router ({ratio['top2']:.2f}x), "
                     f"{verdict['top2_balanced']} with balanced routing ({ratio['top2_balanced']:.2f}x).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU (cuda:0)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per timed batch (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10 on CPU, 50 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches per mode (default 2 on CPU, 10 on cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--models", nargs="+", choices=["experts_dominate", "shipped_demo"],
                        default=["experts_dominate", "shipped_demo"])
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/model_inference_<device>.json)")
    args = parser.parse_args()
    for flag, value in (("--batch-size", args.batch_size), ("--repeats", args.repeats), ("--warmup", args.warmup),
                        ("--threads", args.threads)):
        if value is not None and value < (0 if flag == "--warmup" else 1):
            parser.error(f"{flag} = {value}: expected an integer >= {0 if flag == '--warmup' else 1}")
    cuda = args.device == "cuda"
    args.repeats = args.repeats or (50 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)

    import torch
    if cuda and not torch.cuda.is_available():
        sys.exit(f"bench_model_inference.py: --device cuda: no CUDA GPU visible to torch {torch.__version__} "
                 f"(torch.cuda.is_available() is False); run it on a GPU machine or use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_path = args.out or RESULTS_DIR / f"model_inference_{args.device}.json"
    started = time.time()
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"device": args.device, "batch_size": args.batch_size, "repeats": args.repeats,
                     "warmup": args.warmup, "dtype": "float32", "num_classes": NUM_CLASSES, "flop_batch": FLOP_BATCH},
        "machine": machine_info(args.device, torch.get_num_threads()),
        "models": [],
    }
    blocks = model_blocks()
    for name in args.models:
        results["models"].append(measure(name, blocks[name], args))
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - started
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1))
    print()
    print(render(results))
    print(f"\nwall {results['wall_s']:.0f}s; raw results in {out_path}")
    dominate = [r for r in results["models"] if r["name"] == "experts_dominate"]
    if dominate and dominate[0]["experts_sum_time_to_backbone"] < MIN_EXPERT_TO_BACKBONE:
        sys.exit(f"bench_model_inference.py: experts_dominate: the experts' time is only "
                 f"{dominate[0]['experts_sum_time_to_backbone']:.2f}x the backbone's "
                 f"(need >= {MIN_EXPERT_TO_BACKBONE}); widen EXPERTS_DOMINATE's experts")


if __name__ == "__main__":
    main()
