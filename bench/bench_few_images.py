"""Issue 18 benchmark: learning from few images per class, same budget per row.

flowers12 (``../shared/data/flowers12``: 12 species, ``train/`` 60 and ``test/`` 20 photos each):

1. ``--val-per-class`` photos of each species' ``train/`` become a validation split (seeded, the
   draw of ``bench_real_data.carve_validation``), then at most ``--train-per-class`` of the rest
   (default 15; 0: all 50) are kept for training; ``test/`` (240 photos) is used for no choice.
   ``mgmoe shards build --format imagefolder`` writes one dataset of all 12 species;
2. the arms, each the README's job (``jobs/train.py --deepspeed ds_configs/zero2.json``:
   EfficientNet-Lite0 ImageNet weights, 96 px, warm-up 4 + routing 2 + residual 2 epochs), same
   seed (``train.seed``), epochs and data, differing only in ``--set`` overrides:
   - ``baseline``: none;
   - ``diversity``: ``moe.diversity_weight=0.1``;
   - ``stochastic_depth``: ``model.backbone_options={"drop_path_rate": 0.1}`` and every expert's
     ``drop_path`` 0.1 (``model.experts``: the config's list with ``options.drop_path`` merged in);
   - ``mixup_cutmix``: ``data.mixup=0.8``, ``data.cutmix=1.0``, ``data.mix_off_last_epochs=2``;
   - ``regularisers``: the three above together;
   - ``distill``: ``distill.teacher`` = this work folder's ``baseline`` run (the product's own run
     on the same data: self-distillation; its training is not counted in the row's minutes),
     ``weight`` 0.5, ``label_smoothing`` 0.1, the cosine term on;
   - ``fusion``: ``model.fusion=true`` and a ``fusion`` stage of ``FUSION_EPOCHS`` epochs after
     the residual stage (every earlier parameter frozen, trained from the feature cache: seconds);
   - ``all``: all five together (mixing off in the last 2 + ``FUSION_EPOCHS`` epochs, so the
     residual stage trains on clean images as in ``regularisers``).
3. per arm, ``mgmoe eval`` on the test split: top-1 with its binomial standard error, the paired
   difference against the baseline on the same test images with its paired standard error
   (``mgmoe_ds.evaluation.boxes.paired_comparison``), and the training job's wall time.

Verdict per arm: "helps" / "hurts" when the paired difference is beyond one paired standard
error, else "a tie". Markdown on stdout; ``bench/results/few_images_<N>pc[_seed<S>].json``.

Usage::

    PYTHONPATH=. python bench/bench_few_images.py                       # 15 per species, ~10 min on 2 free cores
    PYTHONPATH=. python bench/bench_few_images.py --seed 1              # another seed (val draw, init, data order)
    PYTHONPATH=. python bench/bench_few_images.py --train-per-class 0   # the full flowers12 (50 per species)
    PYTHONPATH=. python bench/bench_few_images.py --reuse               # continue after a failure
    PYTHONPATH=. python bench/bench_few_images.py --epochs-scale 4 --only mixup_cutmix all  # 4x the epochs
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from bench_real_data import binomial_se, carve_validation, job_parts
from bench_transfer import flowers_parser, mgmoe, parse_flowers_args, prepare_work, run
from machine import command_line, cpu_name, without_per_image, write_results

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "ds_configs" / "zero2.json"
WORK_PARTS = ("images", "shards", "runs", "eval", "logs", "settings.json")
DROP_PATH = 0.1


def stochastic_depth_overrides() -> list[str]:
    """The backbone's ``drop_path_rate`` and each expert of the config with ``options.drop_path``."""
    experts = []
    for spec in json.loads(CONFIG.read_text())["mgmoe"]["model"]["experts"]:
        spec = {"name": spec} if isinstance(spec, str) else json.loads(json.dumps(spec))
        spec["options"] = dict(spec.get("options", {}), drop_path=DROP_PATH)
        experts.append(spec)
    return [f"model.backbone_options={json.dumps({'drop_path_rate': DROP_PATH})}",
            f"model.experts={json.dumps(experts)}"]


FUSION_EPOCHS = 2


def curriculum(scale: int) -> list[dict]:
    """The config's stages with every stage's epochs times ``scale``."""
    return [dict(s, epochs=s["epochs"] * scale) for s in json.loads(CONFIG.read_text())["mgmoe"]["curriculum"]["stages"]]


def fusion_overrides(scale: int = 1) -> list[str]:
    """The fusion module and the (scaled) curriculum with a fusion stage at its end."""
    stages = [*curriculum(scale), {"name": "fusion", "epochs": FUSION_EPOCHS * scale}]
    return ["model.fusion=true", f"curriculum.stages={json.dumps(stages)}"]


DIVERSITY = ["moe.diversity_weight=0.1"]
MIX = ["data.mixup=0.8", "data.cutmix=1.0"]
TEACHER_ARM = "baseline"  # the distillation arms' teacher: this run of the same work folder


def distill_overrides(work: Path) -> list[str]:
    return [f"distill={json.dumps({'teacher': str(work / 'runs' / TEACHER_ARM), 'weight': 0.5})}"]


def arms(work: Path, scale: int = 1) -> dict[str, list[str]]:
    """Each arm's ``--set`` overrides (the distillation arms name ``work``'s teacher run); with
    ``scale`` > 1 every arm trains every stage ``scale`` times as many epochs."""
    stages = [f"curriculum.stages={json.dumps(curriculum(scale))}"] if scale != 1 else []
    mix = [*MIX, f"data.mix_off_last_epochs={2 * scale}"]
    arms = {
        "baseline": [],
        "diversity": DIVERSITY,
        "stochastic_depth": stochastic_depth_overrides(),
        "mixup_cutmix": mix,
        "regularisers": [*DIVERSITY, *stochastic_depth_overrides(), *mix],
        "distill": distill_overrides(work),
        "fusion": fusion_overrides(scale),
        "all": [*DIVERSITY, *stochastic_depth_overrides(), *MIX, f"data.mix_off_last_epochs={(2 + FUSION_EPOCHS) * scale}",
                *distill_overrides(work), *fusion_overrides(scale)],
    }
    return {name: overrides if name in ("fusion", "all") else [*stages, *overrides] for name, overrides in arms.items()}


ARM_NAMES = list(arms(Path(".")))
LABELS = {"baseline": "baseline", "diversity": "+ diversity (0.1)",
          "stochastic_depth": "+ stochastic depth (0.1)", "mixup_cutmix": "+ Mixup 0.8 / CutMix 1.0",
          "regularisers": "+ the three above", "distill": "+ distillation (teacher: the baseline run)",
          "fusion": f"+ fusion stage ({FUSION_EPOCHS} epochs)", "all": "all five together"}


def build_data(args, work: Path) -> tuple[dict, Path]:
    """The image folders (val carved from train) and one shard dataset of all species."""
    images = work / "images"
    if not (images / "done.json").exists():
        shutil.rmtree(images, ignore_errors=True)
        sizes = carve_validation(args.data, images / "all", args.val_per_class, args.seed,
                                 args.train_per_class or None)
        (images / "done.json").write_text(json.dumps({"sizes": sizes}, indent=1))
    data = json.loads((images / "done.json").read_text())
    name = "flowers12"
    if not (work / "shards" / name / "manifest.json").exists():
        shutil.rmtree(work / "shards" / name, ignore_errors=True)
        run(mgmoe("shards", "build", str(images / "all"), "--format", "imagefolder", "--name", name, "--out",
                  str(work / "shards"), "--shard-size", "64", "--seed", str(args.seed), "--no-progress"),
            work / "logs" / f"shards_{name}.log")
    return data, work / "shards" / name


def train(name: str, dataset: Path, overrides: list[str], args, work: Path) -> dict:
    run_dir = work / "runs" / name
    log = work / "logs" / f"train_{name}.log"
    timing = work / "runs" / f"{name}.seconds.json"
    if (args.reuse and (run_dir / "final_metrics.json").exists() and timing.exists()
            and json.loads(timing.read_text())["overrides"] == overrides):  # the same arm, not an old one's name
        print(f"{name}: reused {run_dir}", flush=True)
        return dict(json.loads(timing.read_text()), reused=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{name} ...", flush=True)
    sets = [f"train.seed={args.seed}", *overrides]
    seconds = run([sys.executable, "jobs/train.py", "--deepspeed", str(CONFIG), "--data", str(dataset), "--output",
                   str(run_dir), *[part for o in sets for part in ("--set", o)]], log)
    record = {"seconds": seconds, "log": str(log), "parts": job_parts(log), "overrides": overrides}
    timing.write_text(json.dumps(record))
    print(f"  {seconds / 60:.1f} min", flush=True)
    return dict(record, reused=False)


def evaluate(name: str, work: Path, reuse: bool) -> dict:
    out = work / "eval" / name
    if not (reuse and (out / "report.json").exists() and (out / "report.json").stat().st_mtime
            > (work / "runs" / name / "final_metrics.json").stat().st_mtime):  # evaluated after it was trained
        shutil.rmtree(out, ignore_errors=True)
        run(mgmoe("eval", "--checkpoint", str(work / "runs" / name), "--split", "test", "--out", str(out),
                  "--no-progress"), work / "logs" / f"eval_{name}.log")
    report = json.loads((out / "report.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    top1, n = report["accuracy"]["top1"], report["images"]
    return {"test_top1": top1, "test_se": binomial_se(top1, n), "test_images": n,
            "correct": {p["key"]: p["predicted"] == p["label"] for p in predictions}}


def paired(this: dict, other: dict) -> dict:
    import torch

    from mgmoe_ds.evaluation.boxes import paired_comparison

    keys = sorted(other["correct"])
    if sorted(this["correct"]) != keys:
        sys.exit("the evals did not score the same test images")
    c = paired_comparison(torch.tensor([this["correct"][k] for k in keys]),
                          torch.tensor([other["correct"][k] for k in keys]))
    return c


def verdict(c: dict) -> str:
    if c["tie"]:
        return "a tie"
    return "helps" if c["difference"] > 0 else "hurts"


def render(results: dict) -> str:
    m, s = results["machine"], results["splits"]
    per = f"{results['train_per_class']} per species" if results["train_per_class"] else "all of them"
    lines = [f"Command: {results['command']}",
             f"Machine: {m['cpu']} ({m['cores']} cores); torch {m['torch']}, Python {m['python']}; load average "
             f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end; total wall "
             f"{results['wall_s'] / 60:.1f} min"
             + (f" (reused: {', '.join(results['reused'])})." if results["reused"] else "."),
             f"Data: {results['data']}: train {s['train']} ({per}), val {s['val']} (carved from train, "
             f"{results['val_per_class']} per species), test {s['test']} photos. Config {results['config']}, "
             f"{' + '.join(f'{n} {e}' for n, e in results['stages'])} epochs per job (the fusion arms add "
             f"{FUSION_EPOCHS} fusion epochs); seed {results['seed']}.", "",
             "| arm | test top-1 ± SE | vs baseline ± paired SE (points) | only this right / only baseline right "
             "| verdict | train min |",
             "|---|---:|---:|---:|---|---:|"]
    for name, arm in results["arms"].items():
        t = arm["test"]
        if name == "baseline":
            diff, counts, words = "—", "—", "—"
        else:
            c = arm["vs_baseline"]
            diff = f"{100 * c['difference']:+.1f} ± {100 * c['standard_error']:.1f}"
            counts = f"{c['only_this_right']} / {c['only_other_right']}"
            words = arm["verdict"]
        lines.append(f"| {LABELS[name]} | {t['test_top1']:.3f} ± {t['test_se']:.3f} | {diff} | {counts} | {words} "
                     f"| {arm['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = flowers_parser(__doc__, "images, shards, runs, evals and logs (default "
                                     "/tmp/mgmoe_bench_few_images_<N>pc_seed<S>)")
    parser.add_argument("--train-per-class", type=int, default=15,
                        help="training photos kept per species after the validation split (0: all)")
    parser.add_argument("--only", nargs="+", choices=ARM_NAMES, default=ARM_NAMES,
                        help="run only these arms (the baseline always runs)")
    parser.add_argument("--epochs-scale", type=int, default=1,
                        help="every stage of every arm trains this many times the config's epochs")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the steps whose outputs exist in --work (continue after a failure)")
    args = parse_flowers_args(parser)
    import torch

    started = time.time()
    tag = (f"{args.train_per_class}pc" if args.train_per_class else "full") + (
        f"_x{args.epochs_scale}" if args.epochs_scale != 1 else "")
    args.work = args.work or Path(f"/tmp/mgmoe_bench_few_images_{tag}_seed{args.seed}")
    settings = {"data": str(args.data.resolve()), "seed": args.seed, "val_per_class": args.val_per_class,
                "train_per_class": args.train_per_class}
    prepare_work(args.work, settings, WORK_PARTS, args.reuse)

    data, dataset = build_data(args, args.work)
    stages = [(s["name"], s["epochs"]) for s in curriculum(args.epochs_scale)]
    results = {
        "command": command_line("bench_few_images.py"),
        "data": str(args.data), "config": str(CONFIG.relative_to(ROOT)), "stages": stages, "seed": args.seed,
        "val_per_class": args.val_per_class, "train_per_class": args.train_per_class, "splits": data["sizes"],
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_start": os.getloadavg()},
        "arms": {},
    }
    overrides = arms(args.work, args.epochs_scale)
    names = ["baseline", *(n for n in ARM_NAMES if n != "baseline" and n in args.only)]
    for name in names:  # the baseline first: it is the distillation arms' teacher
        results["arms"][name] = train(name, dataset, overrides[name], args, args.work)
    for name, arm in results["arms"].items():
        print(f"eval {name} ...", flush=True)
        arm["test"] = evaluate(name, args.work, arm["reused"])
    base = results["arms"]["baseline"]["test"]
    for name, arm in results["arms"].items():
        if name != "baseline":
            arm["vs_baseline"] = paired(arm["test"], base)
            arm["verdict"] = verdict(arm["vs_baseline"])
    results["reused"] = [n for n, r in results["arms"].items() if r["reused"]]
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - started

    out = write_results(without_per_image(results, "correct"),
                        f"few_images_{tag}" + (f"_seed{args.seed}" if args.seed else ""))
    print()
    print(render(results))
    print(f"\nraw results in {out}")


if __name__ == "__main__":
    main()
