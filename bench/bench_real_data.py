"""Issue 7 benchmark: accuracy on real photos with a frozen pretrained backbone, same budget for all.

On an image-folder data set of real photos (default ``../shared/data/flowers12``: 12 flower
species, ``train/`` 60 and ``test/`` 20 photos per species), with the frozen offline
EfficientNet-Lite0 (ImageNet) backbone of ``ds_configs/cpu_small.json`` at its resolution:

1. a validation split is carved from ``train/`` (``--val-per-class`` photos per species, seeded)
   and the three splits are written as shards with ``mgmoe shards build``; the test photos are
   never used for any choice;
2. a linear probe on the pooled backbone features (eval transform): full-batch AdamW on the
   cross-entropy, its weight decay chosen on the validation split; the same probe on the frozen
   offline EfficientNet-Lite1 (240 px) and Lite2 (260 px), with each backbone's extraction time
   per image;
3. the product's training job (``python jobs/train.py --deepspeed CONFIG``), once per model, all
   reading one shared feature cache (``cache.dir``) and all trained for the same number of
   epochs, the sum of the config's stage epochs (W warm-up + R routing + S residual):
   - each expert alone: that one expert, dense warm-up for W + R + S epochs;
   - dense fusion: all experts, warm-up (every expert on every image, equal weights) for
     W + R + S epochs, tested with equal weights;
   - MG-MoE Top-K (K = 1, 2, 3) with the curriculum: the config's stages as they are;
   - MG-MoE Top-K without the curriculum: warm-up W epochs, then R + S epochs of plain Top-K
     training of router and experts together (the routing stage with ``kl_weight = 0``: no
     cluster teacher, and no residual stage).

Reports top-1 on the test split with its binomial standard error (and the validation split),
each model's wall time, and, for the routed models, each expert's utilisation on test
(``mgmoe eval``); for the curriculum Top-K models, ``mgmoe ablate`` compares the trained routing
and the router's free Top-K with every fixed subset of experts of the same size. Markdown
tables on stdout; ``bench/results/real_data[_<N>pc].json``.

``--train-per-class N`` keeps N training photos per species (seeded) after the validation split
is carved: the data-limited regime.

``--sweep`` runs, instead, the backbone x cache-depth sweep: for each offline EfficientNet-Lite0/1/2
at its native resolution, the linear probe (the baseline row), then MG-MoE Top-2 with the feature
cache at the end of the backbone (nothing of the backbone trains) and at the config's
``cache.depth`` (the blocks above it train as the config's stages say); one table with each
accuracy's standard error, the gain over the probe, and the minutes of each job by part (feature
caches, then each stage). ``--set KEY=VALUE`` adds an override to every training job.

Usage::

    PYTHONPATH=. python bench/bench_real_data.py                        # flowers12, ~40 min on 2 cores
    PYTHONPATH=. python bench/bench_real_data.py --train-per-class 15   # data-limited flowers12
    PYTHONPATH=. python bench/bench_real_data.py --only linear_probe top2 dense
    PYTHONPATH=. python bench/bench_real_data.py --pretrained efficientnet-lite2 --only linear_probe top2  # frozen Lite2
    PYTHONPATH=. python bench/bench_real_data.py --sweep [--train-per-class 15]  # Lite0/1/2 x cache depth
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flowers12"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
PROBE_STEPS = 300


def carve_validation(src: Path, dst: Path, val_per_class: int, seed: int,
                     train_per_class: int | None = None) -> dict[str, int]:
    """``dst/{train,val,test}/<class>/`` as symlinks: ``val_per_class`` photos of each class of
    ``src/train`` (a seeded draw) go to val, then at most ``train_per_class`` of the rest to train;
    ``src/test`` is linked as it is. Returns split sizes."""
    sizes = {"train": 0, "val": 0, "test": 0}
    for class_dir in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        photos = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(photos) <= val_per_class:
            raise SystemExit(f"{class_dir}: {len(photos)} photos, need more than --val-per-class {val_per_class}")
        random.Random(f"{seed}:{class_dir.name}").shuffle(photos)
        train = photos[val_per_class:][:train_per_class]  # [:None] keeps them all
        for split, chosen in (("val", photos[:val_per_class]), ("train", train)):
            (dst / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for photo in chosen:
                (dst / split / class_dir.name / photo.name).symlink_to(photo.resolve())
            sizes[split] += len(chosen)
    for class_dir in sorted(p for p in (src / "test").iterdir() if p.is_dir()):
        (dst / "test").mkdir(parents=True, exist_ok=True)
        (dst / "test" / class_dir.name).symlink_to(class_dir.resolve())
        sizes["test"] += sum(1 for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return sizes


def stage_epochs(config: dict) -> dict[str, int]:
    stages = config["mgmoe"]["curriculum"]["stages"]
    epochs = {s["name"]: s.get("epochs") for s in stages}
    if [s["name"] for s in stages] != ["warmup", "routing", "residual"] or None in epochs.values():
        raise SystemExit("the config's curriculum must be warmup, routing, residual, each with epochs")
    return epochs


def model_runs(config: dict) -> dict[str, list[str]]:
    """``--set`` overrides of the training job, by model name (see the module docstring)."""
    stages = {s["name"]: s for s in config["mgmoe"]["curriculum"]["stages"]}
    epochs = stage_epochs(config)
    total = sum(epochs.values())
    warmup_only = [dict(stages["warmup"], epochs=total)]
    experts = config["mgmoe"]["model"]["experts"]
    runs: dict[str, list[str]] = {}
    for spec in experts:
        name = spec if isinstance(spec, str) else spec["name"]
        runs[f"expert_{name}"] = [f"model.experts={json.dumps([spec])}", "moe.top_k=1",
                                  f"curriculum.stages={json.dumps(warmup_only)}"]
    runs["dense"] = [f"curriculum.stages={json.dumps(warmup_only)}"]
    no_curriculum = [stages["warmup"], dict(stages["routing"], epochs=epochs["routing"] + epochs["residual"])]
    for k in (1, 2, 3):
        if k > len(experts):
            continue
        runs[f"top{k}"] = [f"moe.top_k={k}"]
        runs[f"top{k}_no_curriculum"] = [f"moe.top_k={k}", "curriculum.kl_weight=0",
                                         f"curriculum.stages={json.dumps(no_curriculum)}"]
    return runs


def backbone_overrides(pretrained: str | None) -> list[str]:
    """``--set`` overrides that put every job on another offline checkpoint at its native resolution."""
    if pretrained is None:
        return []
    from mgmoe_ds.offline_weights import OFFLINE_WEIGHTS

    weights = OFFLINE_WEIGHTS[pretrained]
    return [f"model.backbone={weights.timm_arch}", f"model.pretrained={weights.name}",
            f"model.img_size={weights.native_size}"]


def end_of_backbone_overrides(config: dict) -> list[str]:
    """``--set`` overrides that move the config's feature cache to the end of the backbone: no
    ``cache.depth``, and no stage trains ``backbone_top``."""
    stages = [dict(s, lr={g: lr for g, lr in s.get("lr", {}).items() if g != "backbone_top"})
              for s in config["mgmoe"]["curriculum"]["stages"]]
    return ["cache.depth=null", f"curriculum.stages={json.dumps(stages)}"]


def job_parts(log: Path) -> dict[str, float]:
    """Seconds of each part of a training job, from its log: building the feature caches, then each
    stage (its epochs with their validation)."""
    text = log.read_text()
    unit = {"s": 1, "min": 60, "h": 3600}
    parts = {"feature caches": sum(float(s) for s in re.findall(r"; built in ([\d.]+)s\)", text))}
    for stage, value, scale in re.findall(r"mgmoe: stage (\w+): epoch \d+ took ([\d.]+) (s|min|h)", text):
        parts[stage] = parts.get(stage, 0.0) + float(value) * unit[scale]
    return parts


def train_job(name: str, overrides: list[str], args, dataset: Path, work: Path, pretrained: str | None = None) -> dict:
    run_dir = work / "runs" / name
    overrides = [*backbone_overrides(pretrained or args.pretrained), *args.set, *overrides]
    command = [sys.executable, str(ROOT / "jobs" / "train.py"), "--deepspeed", str(args.config), "--data",
               str(dataset), "--output", str(run_dir), "--set", f"cache.dir={work / 'feature_cache'}",
               "--set", "data.num_workers=1", *[part for o in overrides for part in ("--set", o)]]
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{name}: the training job failed (exit {code}); see {log}")
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    result = {"test_top1": metrics["test"]["top1"], "val_top1": metrics["val"]["top1"], "seconds": seconds,
              "test_images": metrics["test"]["images"], "overrides": overrides, "log": str(log),
              "parts": job_parts(log)}
    if name.startswith("top"):
        result["routing"] = routed_evaluation(name, run_dir, dataset, work)
    return result


def cli(*args: str, log: Path) -> None:
    with log.open("a") as out:
        code = subprocess.run([sys.executable, "-m", "mgmoe_ds.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode
    if code != 0:
        raise SystemExit(f"mgmoe {args[0]} failed (exit {code}); see {log}")


def routed_evaluation(name: str, run_dir: Path, dataset: Path, work: Path) -> dict:
    """Each expert's test utilisation (``mgmoe eval``); for the curriculum Top-K models, the
    ``mgmoe ablate`` verdict: trained routing and free Top-K against every fixed subset of that size."""
    log = work / "logs" / f"{name}_eval.log"
    cli("eval", "--checkpoint", str(run_dir), "--data", str(dataset), "--split", "test", "--out",
        str(work / "eval" / name), "--no-progress", log=log)
    report = json.loads((work / "eval" / name / "report.json").read_text())
    result = {"utilisation": report["routing"]["utilisation"],
              "experts": {k: v["top1"] for k, v in report["variants"].items() if k.startswith("expert ")}}
    if name.endswith("no_curriculum"):
        return result
    cli("ablate", "--checkpoint", str(run_dir), "--data", str(dataset), "--split", "test", "--out",
        str(work / "ablation" / name), "--no-progress", log=log)
    ablation = json.loads((work / "ablation" / name / "ablation.json").read_text())
    rows = ablation["rows"]
    trained = next(r for r in rows if r["kind"] == "trained")
    k = round(trained["experts_per_image"])
    free = next(r for r in rows if r["kind"] == "top_k" and r["k"] == k)
    fixed = [r for r in rows if r["kind"] == "subset" and len(r["experts"]) == k]
    best = max(fixed, key=lambda r: r["top1"]) if fixed else None
    result["ablation"] = {"k": k, "trained_top1": trained["top1"], "free_topk_top1": free["top1"],
                          "best_fixed_subset": best and {"experts": best["experts"], "top1": best["top1"]},
                          "fixed_subsets": {"+".join(r["experts"]): r["top1"] for r in fixed},
                          "oracle_top1": ablation.get("oracle_top1", {}).get(str(k)),
                          "verdict": ablation["verdict"]}
    return result


PROBE_BACKBONES = {"linear_probe_lite1": "efficientnet-lite1", "linear_probe_lite2": "efficientnet-lite2"}


def linear_probe(args, dataset: Path, offline: str | None = None) -> dict:
    """Pooled features of the frozen backbone (eval transform), logistic regression, weight decay
    chosen on val. ``offline``: another offline checkpoint (``efficientnet-lite1``), at its native
    resolution, instead of the config's backbone."""
    import torch
    import torch.nn.functional as F

    from mgmoe_ds.backbone import Backbone
    from mgmoe_ds.config import load_run_config
    from mgmoe_ds.data import make_loader
    from mgmoe_ds.offline_weights import OFFLINE_WEIGHTS

    started = time.perf_counter()
    config, _ = load_run_config(args.config, [])
    model = config.model
    offline = offline or args.pretrained
    if offline is None:
        name, pretrained, img_size, options = model.backbone, model.pretrained, model.img_size, model.backbone_options
    else:
        weights = OFFLINE_WEIGHTS[offline]
        name, pretrained, img_size, options = weights.timm_arch, weights.name, weights.native_size, {}
    backbone = Backbone(name, pretrained=pretrained, img_size=img_size, **options).eval()

    @torch.no_grad()
    def pooled(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader, _ = make_loader(dataset, split, batch_size=32, img_size=img_size, train=False,
                                num_workers=1, transform_options=backbone.preprocessing())
        feats, labels = [], []
        for batch in loader:
            feats.append(backbone(batch["images"], {"pooled"})["pooled"])
            labels.append(batch["labels"])
        return torch.cat(feats), torch.cat(labels)

    extract_started = time.perf_counter()
    data = {split: pooled(split) for split in ("train", "val", "test")}
    extract_seconds = time.perf_counter() - extract_started
    images = sum(int(y.numel()) for _, y in data.values())
    test_images = int(data["test"][1].numel())
    mean, std = data["train"][0].mean(0), data["train"][0].std(0) + 1e-6
    data = {split: ((x - mean) / std, y) for split, (x, y) in data.items()}
    num_classes = int(data["train"][1].max()) + 1

    def fit(weight_decay: float) -> torch.nn.Linear:
        torch.manual_seed(0)
        head = torch.nn.Linear(data["train"][0].shape[1], num_classes)
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=weight_decay)
        x, y = data["train"]
        for _ in range(PROBE_STEPS):
            optimizer.zero_grad()
            F.cross_entropy(head(x), y).backward()
            optimizer.step()
        return head

    @torch.no_grad()
    def top1(head, split: str) -> float:
        x, y = data[split]
        return float((head(x).argmax(1) == y).float().mean())

    val_by_decay = {wd: top1(fit(wd), "val") for wd in PROBE_WEIGHT_DECAYS}
    best = max(PROBE_WEIGHT_DECAYS, key=lambda wd: (val_by_decay[wd], -wd))
    head = fit(best)
    return {"test_top1": top1(head, "test"), "val_top1": top1(head, "val"), "seconds": time.perf_counter() - started,
            "test_images": test_images, "weight_decay": best, "val_by_weight_decay": val_by_decay,
            "backbone": name, "pretrained": pretrained, "img_size": img_size,
            "ms_per_image": 1000 * extract_seconds / images}


LABELS = {
    "linear_probe": "linear probe on pooled features",
    "linear_probe_lite1": "linear probe, frozen Lite1 at 240 px", "linear_probe_lite2": "linear probe, frozen Lite2 at 260 px",
    "dense": "dense fusion of all experts (equal weights)",
    "top1": "MG-MoE Top-1, curriculum", "top2": "**MG-MoE Top-2, curriculum (default)**",
    "top3": "MG-MoE Top-3, curriculum", "top1_no_curriculum": "MG-MoE Top-1, no curriculum stages",
    "top2_no_curriculum": "MG-MoE Top-2, no curriculum stages", "top3_no_curriculum": "MG-MoE Top-3, no curriculum stages",
}


def run_lines(results: dict) -> list[str]:
    """The command and the machine a results table came from."""
    m = results["machine"]
    return [f"Command: {results['command']}",
            f"Machine: {m['cpu']} ({m['cores']} cores); torch {m['torch']}, Python {m['python']}; load average "
            f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end; total wall "
            f"{results['wall_s'] / 60:.1f} min."]


def render(results: dict) -> str:
    lines = [
        *run_lines(results),
        f"Data: {results['data']} -> train {results['splits']['train']}, val {results['splits']['val']} (carved from "
        f"train), test {results['splits']['test']} photos, {results['num_classes']} species. Budget: "
        f"{results['epochs']} epochs per model; config {results['config']}"
        + (f" with {', '.join(results['backbone_overrides'])}" if results.get("backbone_overrides") else "") + ".",
        "",
        "| model | test top-1 | ± SE | val top-1 | expert utilisation on test | wall (s) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, r in results["models"].items():
        label = LABELS.get(name, f"{name.removeprefix('expert_')} expert alone" if name.startswith("expert_") else name)
        use = ", ".join(f"{e.split(':')[1]} {100 * u:.0f}%" for e, u in r.get("routing", {}).get("utilisation",
                                                                                                 {}).items())
        lines.append(f"| {label} | {r['test_top1']:.3f} | {binomial_se(r['test_top1'], r['test_images']):.3f} | "
                     f"{r['val_top1']:.3f} | {use or '-'} | {r['seconds']:.0f} |")
    costs = [f"{r['pretrained']} at {r['img_size']} px {r['ms_per_image']:.1f} ms"
             for r in results["models"].values() if "ms_per_image" in r]
    if costs:
        lines += ["", "Frozen-backbone cost per image (JPEG decode in one loader worker + forward, batch 32, eval "
                      "transform), from the probes' feature passes: " + "; ".join(costs) + "."]
    ablations = {n: r["routing"]["ablation"] for n, r in results["models"].items() if "ablation" in r.get("routing", {})}
    if ablations:
        lines += ["", "`mgmoe ablate` on the test split, the same trained weights: the trained routing and the "
                      "router's free Top-K against every fixed subset of the same size (router-weighted fusion).",
                  "", "| model | trained routing | free Top-K | best fixed subset | per-image oracle over the fixed "
                      "subsets (bound) | all fixed subsets |",
                  "|---|---:|---:|---|---:|---|"]
        for name, a in ablations.items():
            best = a["best_fixed_subset"]
            subsets = ", ".join(f"{k} {v:.3f}" for k, v in sorted(a["fixed_subsets"].items(), key=lambda kv: -kv[1]))
            oracle = f"{a['oracle_top1']:.3f}" if a.get("oracle_top1") is not None else "-"
            lines.append(f"| {LABELS.get(name, name)} | {a['trained_top1']:.3f} | {a['free_topk_top1']:.3f} | "
                         f"{'+'.join(best['experts'])} {best['top1']:.3f} | {oracle} | {subsets} |" if best else
                         f"| {LABELS.get(name, name)} | {a['trained_top1']:.3f} | {a['free_topk_top1']:.3f} | - | - | - |")
    return "\n".join(lines)


SWEEP_BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def sweep_rows(config: dict) -> list[tuple[str, str, str | None, list[str]]]:
    """The backbone x cache-depth sweep: ``(row name, kind, offline checkpoint, overrides)``, per
    backbone its linear probe, then MG-MoE Top-2 with the cache at the end of the backbone and at
    the config's ``cache.depth``."""
    depth = config["mgmoe"].get("cache", {}).get("depth")
    if depth is None:
        raise SystemExit("--sweep compares the end of the backbone with the config's cache.depth; the config has none")
    rows = []
    for offline in SWEEP_BACKBONES:
        short = offline.removeprefix("efficientnet-")
        rows += [(f"{short}_probe", "probe", offline, []),
                 (f"{short}_top2_end", "job", offline, ["moe.top_k=2", *end_of_backbone_overrides(config)]),
                 (f"{short}_top2_depth{depth}", "job", offline, ["moe.top_k=2"])]
    return rows


def render_sweep(results: dict) -> str:
    lines = [
        *run_lines(results),
        f"Data: {results['data']} -> train {results['splits']['train']}, val {results['splits']['val']}, test "
        f"{results['splits']['test']} photos, {results['num_classes']} species; config {results['config']}"
        + (f" with {', '.join(results['extra_overrides'])}" if results.get("extra_overrides") else "") + ".",
        "",
        "| backbone | model | cache | test top-1 ± SE | vs the probe (points) | minutes | time by part (s) |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    probes = {}
    for name, r in results["models"].items():
        short = name.split("_")[0]
        se = binomial_se(r["test_top1"], r["test_images"])
        if name.endswith("_probe"):
            probes[short] = r["test_top1"]
            lines.append(f"| {short} at {r['img_size']} px | linear probe (baseline) | - | {r['test_top1']:.3f} ± "
                         f"{se:.3f} | - | {r['seconds'] / 60:.1f} | features {r['ms_per_image']:.0f} ms/image |")
            continue
        where = "end of backbone" if name.endswith("_end") else f"after block {name.rsplit('depth', 1)[1]}"
        vs_probe = "-"
        if short in probes:  # the difference's SE from both accuracies' SEs: below it, a tie
            gain = r["test_top1"] - probes[short]
            gain_se = (se ** 2 + binomial_se(probes[short], r["test_images"]) ** 2) ** 0.5
            vs_probe = f"{100 * gain:+.1f} ({'tie, ' if abs(gain) < gain_se else ''}SE {100 * gain_se:.1f})"
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r["parts"].items())
        lines.append(f"| {short} | MG-MoE Top-2 | {where} | {r['test_top1']:.3f} ± {se:.3f} | {vs_probe} | "
                     f"{r['seconds'] / 60:.1f} | {parts} |")
    return "\n".join(lines)


def binomial_se(p: float, n: int) -> float:
    """The binomial standard error of an accuracy ``p`` on ``n`` images."""
    return (p * (1 - p) / max(1, n)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder with train/ and test/")
    parser.add_argument("--config", type=Path, default=ROOT / "ds_configs" / "cpu_small.json")
    parser.add_argument("--val-per-class", type=int, default=12)
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="keep at most this many training photos per species (the data-limited regime)")
    parser.add_argument("--work", type=Path, default=None,
                        help="shards, runs, logs and the shared feature cache (default bench/results/real_data_work[_<N>pc])")
    parser.add_argument("--only", nargs="+", default=None, help="models to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrained", default=None, choices=["efficientnet-lite0", "efficientnet-lite1",
                                                               "efficientnet-lite2"],
                        help="every model on this frozen offline backbone at its native resolution (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every training job (repeatable), e.g. cache.views=4")
    parser.add_argument("--sweep", action="store_true",
                        help="the backbone x cache-depth sweep: Lite0/1/2, each its probe and Top-2 at the end of the "
                             "backbone and at the config's cache.depth, one table")
    args = parser.parse_args()
    if not (args.data / "train").is_dir() or not (args.data / "test").is_dir():
        sys.exit(f"--data {args.data}: expected an image folder with train/ and test/")
    import torch

    config = json.loads(args.config.read_text())
    runs = model_runs(config)
    probes = ["linear_probe", *PROBE_BACKBONES]
    names = args.only or [*probes, *runs]
    unknown = sorted(set(names) - {*probes, *runs})
    if unknown:
        sys.exit(f"--only {unknown[0]}: expected some of {', '.join(probes)}, {', '.join(runs)}")
    sweep = sweep_rows(config) if args.sweep else None
    started = time.time()
    suffix = (("_sweep" if args.sweep else "") + (f"_{args.train_per_class}pc" if args.train_per_class else "")
              + (f"_{args.pretrained}" if args.pretrained else ""))
    args.work = args.work or ROOT / "bench" / "results" / f"real_data_work{suffix}"
    shutil.rmtree(args.work, ignore_errors=True)
    splits = carve_validation(args.data, args.work / "images", args.val_per_class, args.seed, args.train_per_class)
    subprocess.run([sys.executable, "-m", "mgmoe_ds.cli", "shards", "build", str(args.work / "images"), "--format",
                    "imagefolder", "--name", args.data.name, "--out", str(args.work / "shards"), "--shard-size", "64",
                    "--no-progress"], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    dataset = args.work / "shards" / args.data.name
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": str(args.data), "splits": splits, "config": str(args.config.relative_to(ROOT)),
        "backbone_overrides": backbone_overrides(args.pretrained), "extra_overrides": args.set,
        "num_classes": len(json.loads((dataset / "manifest.json").read_text())["classes"]),
        "epochs": sum(stage_epochs(config).values()),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_start": os.getloadavg()},
        "models": {},
    }
    out = ROOT / "bench" / "results" / f"real_data{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if sweep is not None:  # one job per row: (name, () -> its result)
        jobs = [(name, partial(linear_probe, args, dataset, offline) if kind == "probe"
                 else partial(train_job, name, overrides, args, dataset, args.work, offline))
                for name, kind, offline, overrides in sweep]
    else:
        jobs = [(name, partial(linear_probe, args, dataset, PROBE_BACKBONES.get(name)) if name in probes
                 else partial(train_job, name, runs[name], args, dataset, args.work)) for name in names]
    for name, job in jobs:
        print(f"{name} ...", flush=True)
        r = results["models"][name] = job()
        print(f"  test top-1 {r['test_top1']:.3f}, val top-1 {r['val_top1']:.3f}, {r['seconds']:.0f} s", flush=True)
        results["machine"]["loadavg_end"] = os.getloadavg()
        results["wall_s"] = time.time() - started
        out.write_text(json.dumps(results, indent=1))  # after every model: an interrupted run keeps its rows
    print()
    print(render_sweep(results) if sweep is not None else render(results))
    print(f"\nraw results in {out}")


if __name__ == "__main__":
    main()
