"""Issue 17 benchmark: adding species to last year's model (``--init-from``, ``--freeze``), same budget.

flowers12 (``../shared/data/flowers12``: 12 species, ``train/`` 60 and ``test/`` 20 photos each)
split into 8 "base" species (the first 8 in sorted name order) and 4 "new" ones (the last 4):

1. ``--val-per-class`` photos of each species' ``train/`` become a validation split (seeded, the
   draw of ``bench_real_data.carve_validation``); ``test/`` is kept as it is and used for no choice.
   ``mgmoe shards build --format imagefolder`` writes two datasets, ``base8`` and ``new4``;
   ``mgmoe shards register`` adds base8, then new4, to a registry file in the work folder: the
   append-only union label space of the 12 species, base species first;
2. the base model: the README's job (``jobs/train.py --deepspeed ds_configs/zero2.json``:
   EfficientNet-Lite0 ImageNet weights, 96 px, warm-up 4 + routing 2 + residual 2 epochs) on base8;
3. three arms on the registry's 12 species, same config, epochs and seed (``train.seed``):
   - ``direct``: from the ImageNet weights, as the base model was;
   - ``transfer``: ``--init-from`` the base run, everything trains;
   - ``transfer_frozen``: ``--init-from`` the base run with ``--freeze backbone,experts`` (heads,
     router and fallback head train; from images, as the config's ``data.balance`` refuses the cache);
4. per arm: validation top-1 after every epoch (``metrics.jsonl``, epochs counted across stages),
   ``mgmoe eval`` on the test split: top-1 over the 12 species and over the 4 new ones, each with
   its binomial standard error, and the training job's wall time.

Verdicts in words: the first epoch at which each transfer arm's validation top-1 reaches the
direct arm's final validation top-1 (or never), and freezing against training everything on test
top-1 (all 12 species, then the new 4), the difference against its paired standard error (same
test images; within one standard error is a tie). Markdown on stdout; ``bench/results/transfer.json``
and the curves in ``bench/results/transfer_curves.png`` (``transfer_quick*`` with ``--quick``).

Usage::

    PYTHONPATH=. python bench/bench_transfer.py            # ~15 min on 2 free cores (4 training jobs, 3 evals)
    PYTHONPATH=. python bench/bench_transfer.py --reuse    # continue after a failure: keeps finished steps
    PYTHONPATH=. python bench/bench_transfer.py --seed 1   # another seed (validation draw, init, data order)
    PYTHONPATH=. python bench/bench_transfer.py --quick    # smoke test only (1 epoch per stage, 64 px, 8 photos
                                                           # per species): ~4 min on free cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_real_data import binomial_se, carve_validation, job_parts
from machine import command_line, cpu_name, without_per_image, write_results

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "ds_configs" / "zero2.json"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flowers12"
BASE_SPECIES = 8  # the first 8 species in sorted name order are "base", the rest "new"
QUICK_TRAIN_PER_CLASS = 8  # --quick's training photos per species
ARMS = {  # arm -> (starts from the base run, --freeze)
    "direct": (False, None),
    "transfer": (True, None),
    "transfer_frozen": (True, "backbone,experts"),
}
LABELS = {"direct": "direct (ImageNet weights)", "transfer": "transfer, everything trains",
          "transfer_frozen": "transfer, backbone + experts frozen"}
SHORT = {"transfer": "Transfer (everything trains)", "transfer_frozen": "Transfer with backbone + experts frozen"}
WORK_PARTS = ("images", "shards", "registry.json", "runs", "eval", "logs", "settings.json")


def run(command: list[str], log: Path) -> float:
    """Runs ``command`` from the repository root, output to ``log``; returns its wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  {shlex.join(command)}  (log {log})", flush=True)
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        sys.exit(f"failed (exit {code}): {shlex.join(command)}\n  {tail[0]}\n  see {log}")
    return time.perf_counter() - started


def flowers_parser(description: str, work_help: str) -> argparse.ArgumentParser:
    """The options every flowers12 benchmark takes: --data, --work, --seed, --val-per-class."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder with train/ and test/")
    parser.add_argument("--work", type=Path, default=None, help=work_help)
    parser.add_argument("--seed", type=int, default=0, help="validation draw, shard order and train.seed")
    parser.add_argument("--val-per-class", type=int, default=10)
    return parser


def parse_flowers_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if not (args.data / "train").is_dir() or not (args.data / "test").is_dir():
        sys.exit(f"--data {args.data}: expected an image folder with train/ and test/")
    return args


def prepare_work(work: Path, settings: dict, parts: tuple[str, ...], reuse: bool) -> None:
    """The work folder for a run with ``settings``: with ``reuse`` it must have been made with the
    same settings (its finished steps are kept); without, the ``parts`` this script writes there go."""
    settings_file = work / "settings.json"
    if reuse and settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        sys.exit(f"--reuse: {work} was made with {settings_file.read_text().strip()}; not with {settings}")
    if not reuse:
        for part in parts:  # only what the script writes there
            path = work / part
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings))


def mgmoe(*args: str) -> list[str]:
    return [sys.executable, "-m", "mgmoe_ds.cli", *args]


def quick_overrides() -> list[str]:
    """``--set`` overrides of ``--quick``: every stage of the config 1 epoch, 64 px."""
    stages = json.loads(CONFIG.read_text())["mgmoe"]["curriculum"]["stages"]
    return [f"curriculum.stages={json.dumps([dict(s, epochs=1) for s in stages])}", "model.img_size=64"]


def stage_epochs(overrides: list[str]) -> list[tuple[str, int]]:
    """``(stage, epochs)`` of the curriculum the jobs run (the config's, or ``--quick``'s)."""
    stages = json.loads(CONFIG.read_text())["mgmoe"]["curriculum"]["stages"]
    for text in overrides:
        if text.startswith("curriculum.stages="):
            stages = json.loads(text.partition("=")[2])
    return [(s["name"], s["epochs"]) for s in stages]


def build_data(args, work: Path) -> dict:
    """The image folders (val carved from train), the base8 and new4 shard datasets and the registry."""
    images = work / "images"
    if not (images / "done.json").exists():
        shutil.rmtree(images, ignore_errors=True)
        sizes = carve_validation(args.data, images / "all", args.val_per_class, args.seed, args.train_per_class)
        species = sorted(p.name for p in (images / "all" / "train").iterdir())
        groups = {"base8": species[:BASE_SPECIES], "new4": species[BASE_SPECIES:]}
        for name, members in groups.items():  # each group's folder: symlinks to its species' folders
            for split in ("train", "val", "test"):
                (images / name / split).mkdir(parents=True)
                for s in members:
                    (images / name / split / s).symlink_to((images / "all" / split / s).resolve())
        (images / "done.json").write_text(json.dumps({"sizes": sizes, "groups": groups}, indent=1))
    data = json.loads((images / "done.json").read_text())
    for name in data["groups"]:
        if not (work / "shards" / name / "manifest.json").exists():
            shutil.rmtree(work / "shards" / name, ignore_errors=True)
            run(mgmoe("shards", "build", str(images / name), "--format", "imagefolder", "--name", name, "--out",
                      str(work / "shards"), "--shard-size", "64", "--seed", str(args.seed), "--no-progress"),
                work / "logs" / f"shards_{name}.log")
    registry = work / "registry.json"
    if not registry.exists() or set(json.loads(registry.read_text())["datasets"]) != set(data["groups"]):
        registry.unlink(missing_ok=True)
        for name in data["groups"]:  # base8 first: its species keep indices 0..7
            run(mgmoe("shards", "register", str(work / "shards" / name), "--registry", str(registry)),
                work / "logs" / f"register_{name}.log")
    classes = json.loads(registry.read_text())["classes"]
    expected = data["groups"]["base8"] + data["groups"]["new4"]
    if classes != expected:
        sys.exit(f"{registry}: classes {classes}, expected the base species then the new ones: {expected}")
    return data


def train(name: str, data: str, extra: list[str], args, work: Path, reuse: bool) -> dict:
    """One training job (skipped when ``reuse`` and it finished before); its seconds, log and whether
    it was reused."""
    run_dir = work / "runs" / name
    log = work / "logs" / f"train_{name}.log"
    timing = work / "runs" / f"{name}.seconds.json"
    if reuse and (run_dir / "final_metrics.json").exists() and timing.exists():
        print(f"{name}: reused {run_dir}", flush=True)
        return dict(json.loads(timing.read_text()), reused=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{name} ...", flush=True)
    overrides = [f"train.seed={args.seed}", *args.overrides]
    seconds = run([sys.executable, "jobs/train.py", "--deepspeed", str(CONFIG), "--data", data, "--output",
                   str(run_dir), *extra, *[part for o in overrides for part in ("--set", o)]], log)
    record = {"seconds": seconds, "log": str(log), "parts": job_parts(log)}
    timing.write_text(json.dumps(record))
    print(f"  {seconds / 60:.1f} min", flush=True)
    return dict(record, reused=False)


def validation_curve(run_dir: Path, stages: list[tuple[str, int]]) -> list[dict]:
    """Validation top-1 after each epoch, epochs counted across stages (1, 2, ...)."""
    offset, before = {}, 0
    for stage, epochs in stages:
        offset[stage], before = before, before + epochs
    points = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "validation":  # a resumed epoch's line replaces the earlier one
            epoch = offset[event["stage"]] + event["epoch"]
            points[epoch] = {"epoch": epoch, "stage": event["stage"], "stage_epoch": event["epoch"],
                             "step": event["step"], "val_top1": event["val_top1"]}
    return [points[e] for e in sorted(points)]


def evaluate(name: str, work: Path, new_species: list[str], reuse: bool) -> dict:
    """``mgmoe eval`` on the test split (the run's own dataset: the registry): top-1 over all species
    and over the new ones, and each image's correctness for the paired comparison."""
    out = work / "eval" / name
    if not (reuse and (out / "report.json").exists()):
        shutil.rmtree(out, ignore_errors=True)
        run(mgmoe("eval", "--checkpoint", str(work / "runs" / name), "--split", "test", "--out", str(out),
                  "--no-progress"), work / "logs" / f"eval_{name}.log")
    report = json.loads((out / "report.json").read_text())
    names = [c["species"] for c in report["accuracy"]["per_class"]]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    images = {s: sum(p["label"] == i for p in predictions) for i, s in enumerate(names)}  # test images per species
    per_class = {c["species"]: c["top1"] for c in report["accuracy"]["per_class"]}
    new_images = sum(images[s] for s in new_species)
    new_top1 = round(sum(per_class[s] * images[s] for s in new_species)) / new_images  # hits / images
    top1, n = report["accuracy"]["top1"], report["images"]
    new_labels = {names.index(s) for s in new_species}
    return {"test_top1": top1, "test_se": binomial_se(top1, n), "test_images": n,
            "new_top1": new_top1, "new_se": binomial_se(new_top1, new_images), "new_images": new_images,
            "per_class_top1": per_class,
            "correct": {p["key"]: p["predicted"] == p["label"] for p in predictions},
            "new_keys": sorted(p["key"] for p in predictions if p["label"] in new_labels)}


def paired(this: dict, other: dict, keys: list[str]) -> dict:
    """Top-1 of ``this`` minus ``other`` on the same images, with the paired standard error
    (``mgmoe_ds.evaluation.boxes.paired_comparison``: a difference within one SE is a tie)."""
    import torch

    from mgmoe_ds.evaluation.boxes import paired_comparison

    return paired_comparison(torch.tensor([this["correct"][k] for k in keys]),
                             torch.tensor([other["correct"][k] for k in keys]))


def verdicts(results: dict) -> dict:
    arms = results["arms"]
    target = arms["direct"]["curve"][-1]["val_top1"]
    total = arms["direct"]["curve"][-1]["epoch"]
    se = binomial_se(target, results["splits"]["val"])

    def first_epoch(name: str, threshold: float):
        return next((p["epoch"] for p in arms[name]["curve"] if p["val_top1"] >= threshold - 1e-9), None)

    # "reaches" within one standard error too: a smaller gap on 120 validation images is noise
    direct_within = first_epoch("direct", target - se)
    reach = {}
    for name in ("transfer", "transfer_frozen"):
        epoch, within = first_epoch(name, target), first_epoch(name, target - se)
        goal = f"the direct run's final validation top-1 ({target:.3f}, after {total} epochs)"
        reach[name] = {"epoch": epoch, "epoch_within_one_se": within, "direct_epoch_within_one_se": direct_within,
                       "sentence": (
            (f"{SHORT[name]} reaches {goal} at epoch {epoch} of {total}" if epoch is not None
             else f"{SHORT[name]} does not reach {goal} in {total} epochs")
            + (f"; it comes within one standard error ({se:.3f}, {results['splits']['val']} validation images) "
               f"of it at epoch {within}" if within is not None else "; nor within one standard error of it")
            + f" (the direct run itself: epoch {direct_within}).")}
    c = paired(arms["transfer"]["test"], arms["direct"]["test"], sorted(arms["direct"]["test"]["correct"]))
    gap, paired_se = 100 * c["difference"], 100 * c["standard_error"]
    reach["final_test"] = {**{k: c[k] for k in ("images", "top1", "other_top1", "difference", "standard_error", "tie")},
                           "sentence": f"Test top-1 after the same budget, transfer (everything trains) "
                                       f"{c['top1']:.3f} vs direct {c['other_top1']:.3f}: "
                                       + (f"a tie ({gap:+.1f} points, paired SE {paired_se:.1f})." if c["tie"] else
                                          f"{gap:+.1f} points, more than one paired SE ({paired_se:.1f}).")}
    freezing = {}
    frozen, everything = arms["transfer_frozen"]["test"], arms["transfer"]["test"]
    for key, scope, keys, top1 in (("all_species", "all 12 species", sorted(frozen["correct"]), "test_top1"),
                                   ("new_species", "the 4 new species", frozen["new_keys"], "new_top1")):
        c = paired(frozen, everything, keys)
        gap, se = 100 * c["difference"], 100 * c["standard_error"]
        if c["tie"]:
            words = f"a tie: {gap:+.1f} points, within one paired standard error ({se:.1f})"
        else:
            words = (f"freezing {'costs' if gap < 0 else 'gains'} {abs(gap):.1f} points, more than one paired "
                     f"standard error ({se:.1f})")
        freezing[key] = {**{k: c[k] for k in ("images", "top1", "other_top1", "difference", "standard_error",
                                                   "only_this_right", "only_other_right", "tie")},
                           "sentence": f"Test top-1 on {scope} ({c['images']} images), backbone + experts frozen "
                                       f"{frozen[top1]:.3f} vs everything trained {everything[top1]:.3f}: {words}."}
    return {"direct_final_val_top1": target, "reaches_direct": reach, "freezing": freezing}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, arm in results["arms"].items():
        curve = arm["curve"]
        ax.plot([p["epoch"] for p in curve], [p["val_top1"] for p in curve], marker="o", label=LABELS[name])
    ax.axhline(results["verdicts"]["direct_final_val_top1"], color="grey", linestyle=":", linewidth=1,
               label="direct, final")
    end = 0
    for stage, epochs in results["stages"]:
        ax.axvline(end + 0.5, color="black", linestyle="--", linewidth=0.6)
        ax.text(end + 0.6, 0.97, stage, transform=ax.get_xaxis_transform(), fontsize=8, va="top")
        end += epochs
    ax.set_xlim(0.4, end + 0.5)
    ax.set_xticks(range(1, end + 1))
    ax.set_xlabel("epoch (across stages)")
    ax.set_ylabel("validation top-1 (12 species)")
    ax.set_title(f"flowers12: 8 base + 4 new species, seed {results['seed']}"
                 + (" (--quick smoke test)" if results["quick"] else ""))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: dict) -> str:
    m, s = results["machine"], results["splits"]
    lines = [f"Command: {results['command']}",
             f"Machine: {m['cpu']} ({m['cores']} cores); torch {m['torch']}, Python {m['python']}; load average "
             f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end; total wall "
             f"{results['wall_s'] / 60:.1f} min"
             + (f" (reused from an earlier invocation: {', '.join(results['reused'])})." if results["reused"] else "."),
             f"Data: {results['data']}, base {', '.join(results['species']['base'])}; new "
             f"{', '.join(results['species']['new'])}. Train {s['train']}, val {s['val']} (carved from train, "
             f"{results['val_per_class']} per species), test {s['test']} photos"
             + (f" (at most {results['train_per_class']} training photos per species)" if results["train_per_class"]
                else "") + f". Config {results['config']}"
             + (f" with {', '.join(results['overrides'])}" if results["overrides"] else "")
             + f"; {' + '.join(f'{n} {e}' for n, e in results['stages'])} epochs per job; seed {results['seed']}.",
             f"Base model on the 8 base species: {results['base']['seconds'] / 60:.1f} min.", "",
             "| arm | val top-1 per epoch | test top-1 (12) ± SE | new 4 ± SE | train min |",
             "|---|---|---:|---:|---:|"]
    for name, arm in results["arms"].items():
        t = arm["test"]
        curve = " ".join(f"{p['val_top1']:.2f}" for p in arm["curve"])
        lines.append(f"| {LABELS[name]} | {curve} | {t['test_top1']:.3f} ± {t['test_se']:.3f} | "
                     f"{t['new_top1']:.3f} ± {t['new_se']:.3f} | {arm['seconds'] / 60:.1f} |")
    v = results["verdicts"]
    lines += ["", *(r["sentence"] for r in v["reaches_direct"].values()),
              *(f["sentence"] for f in v["freezing"].values())]
    return "\n".join(lines)


def main() -> None:
    parser = flowers_parser(__doc__, "images, shards, registry, runs, evals and logs (default "
                                     "/tmp/mgmoe_bench_transfer[_quick])")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="keep at most this many training photos per species (default: all; --quick: 8)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test only: every stage 1 epoch at 64 px, 8 training photos per species; writes "
                             "transfer_quick*, never transfer.json")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the steps whose outputs exist in --work (continue after a failure)")
    args = parse_flowers_args(parser)
    import torch

    started = time.time()
    args.overrides = quick_overrides() if args.quick else []
    if args.quick and args.train_per_class is None:
        args.train_per_class = QUICK_TRAIN_PER_CLASS
    args.work = args.work or Path("/tmp/mgmoe_bench_transfer" + ("_quick" if args.quick else ""))
    settings = {"data": str(args.data.resolve()), "seed": args.seed, "val_per_class": args.val_per_class,
                "train_per_class": args.train_per_class, "overrides": args.overrides}
    prepare_work(args.work, settings, WORK_PARTS, args.reuse)

    data = build_data(args, args.work)
    stages = stage_epochs(args.overrides)
    limited = f"_{args.train_per_class}pc" if args.train_per_class and not args.quick else ""
    suffix = ("_quick" if args.quick else "") + limited + (f"_seed{args.seed}" if args.seed else "")
    results = {
        "command": command_line("bench_transfer.py"),
        "data": str(args.data), "config": str(CONFIG.relative_to(ROOT)), "overrides": args.overrides,
        "quick": args.quick, "stages": stages, "seed": args.seed, "val_per_class": args.val_per_class,
        "train_per_class": args.train_per_class,
        "splits": data["sizes"], "species": {"base": data["groups"]["base8"], "new": data["groups"]["new4"]},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_start": os.getloadavg()},
    }
    base = results["base"] = train("base", str(args.work / "shards" / "base8"), [], args, args.work, args.reuse)
    registry = str(args.work / "registry.json")
    results["arms"] = {}
    for name, (from_base, freeze) in ARMS.items():
        extra = [*(["--init-from", str(args.work / "runs" / "base")] if from_base else []),
                 *(["--freeze", freeze] if freeze else [])]
        reuse = args.reuse and (base["reused"] or not from_base)  # a new base model: its transfers run again
        arm = train(name, registry, extra, args, args.work, reuse)
        arm["command_extra"] = extra
        arm["curve"] = validation_curve(args.work / "runs" / name, stages)
        results["arms"][name] = arm
    for name, arm in results["arms"].items():
        print(f"eval {name} ...", flush=True)
        arm["test"] = evaluate(name, args.work, data["groups"]["new4"], arm["reused"])
    results["reused"] = [n for n, r in [("base", base), *results["arms"].items()] if r["reused"]]
    results["verdicts"] = verdicts(results)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - started

    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = out_dir / f"transfer_curves{suffix}.png"
    plot(results, figure)
    out = write_results(without_per_image(results, "correct", "new_keys"), f"transfer{suffix}")
    print()
    print(render(results))
    print(f"\nraw results in {out}; curves in {figure}")


if __name__ == "__main__":
    main()
