"""Issue 19 benchmark (in part): flowers12 with 70% of its training labels hidden, and pseudo-labels.

1. ``--val-per-class`` photos of each species' ``train/`` become a validation split (seeded, as in
   ``bench_few_images.py``); of the rest (50 per species), ``--labelled-fraction`` (default 0.3:
   15 per species) keep their labels and the others go, renamed ``<n>.<ext>`` in one flat folder,
   to the unlabelled split (``mgmoe shards build --unlabelled``); their species are kept aside as
   the hidden truth. ``test/`` (240 photos) is used for no choice.
2. ``labelled``: the README's job (``ds_configs/zero2.json``) on the labelled 30% alone.
3. ``mgmoe pseudo-label --model <labelled run> --data D --out D_pl`` (the pair network on that
   model's features); the pseudo-labels' precision and coverage at several thresholds against the
   hidden truth.
4. ``pseudo@t``: the same job on D_pl with ``data.pseudo_min_score = t`` for each ``--use``
   threshold: the same epochs (so more steps per epoch: the pseudo-labelled photos are extra
   training images), the same seed; and ``labelled xN``: the labelled-only job with every stage
   N times its epochs, N the ratio of ``pseudo@<lowest t>``'s training images to the labelled
   ones (rounded): the same number of steps as that pseudo arm.
5. ``mgmoe eval`` on test: top-1 with its binomial SE, and each pseudo arm's paired difference
   against ``labelled`` with the paired SE.

Markdown on stdout; ``bench/results/pseudo_labels.json``.

Usage::

    PYTHONPATH=. python bench/bench_pseudo_labels.py          # ~10 min on 2 free cores
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path

from bench_few_images import evaluate, paired, verdict
from bench_real_data import binomial_se, carve_validation
from bench_transfer import flowers_parser, mgmoe, parse_flowers_args, prepare_work, run
from machine import command_line, machine_record, without_per_image, write_results

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "ds_configs" / "zero2.json"
THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 0.9]
WORK_PARTS = ("images", "shards", "runs", "eval", "logs", "truth.json", "settings.json")


def hide_labels(args, work: Path) -> dict:
    """The carved image folders with ``labelled_fraction`` of each species' training photos kept
    and the rest moved to ``images/unlabelled``; returns the hidden truth ``{stem: species}``."""
    images = work / "images"
    if (work / "truth.json").exists():
        return json.loads((work / "truth.json").read_text())
    shutil.rmtree(images, ignore_errors=True)
    carve_validation(args.data, images / "all", args.val_per_class, args.seed, None)
    rng = random.Random(args.seed)
    (images / "unlabelled").mkdir(parents=True)
    truth, number = {}, 0
    for species in sorted(p for p in (images / "all" / "train").iterdir() if p.is_dir()):
        photos = sorted(species.iterdir())
        rng.shuffle(photos)
        keep = round(len(photos) * args.labelled_fraction)
        for photo in photos[keep:]:
            stem = f"{number:05d}"
            shutil.move(str(photo), images / "unlabelled" / f"{stem}{photo.suffix.lower()}")
            truth[stem] = species.name
            number += 1
    (work / "truth.json").write_text(json.dumps(truth, indent=0))
    return truth


def pseudo_records(dataset: Path) -> list[dict]:
    """Every pseudo-labelled sample's ``{"stem", "species", "score"}`` from the written shards."""
    records = []
    for shard in sorted(dataset.glob("*-pseudo-train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    records.append({"stem": Path(meta["path"]).stem, "species": meta["species"],
                                    "score": float(meta["pseudo"]["score"])})
    return records


def train(name: str, dataset: Path, overrides: list[str], args, work: Path) -> dict:
    run_dir, log = work / "runs" / name, work / "logs" / f"train_{name}.log"
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{name} ...", flush=True)
    sets = [f"train.seed={args.seed}", *overrides]
    seconds = run([sys.executable, "jobs/train.py", "--deepspeed", str(CONFIG), "--data", str(dataset), "--output",
                   str(run_dir), *[part for o in sets for part in ("--set", o)]], log)
    print(f"  {seconds / 60:.1f} min", flush=True)
    return {"seconds": seconds, "overrides": overrides, "reused": False}


def main() -> None:
    parser = flowers_parser(__doc__, "images, shards, runs, evals and logs (default /tmp/mgmoe_bench_pseudo_labels)")
    parser.add_argument("--labelled-fraction", type=float, default=0.3)
    parser.add_argument("--use", type=float, nargs="+", default=[0.0, 0.5],
                        help="data.pseudo_min_score of each pseudo-labelled training arm")
    args = parse_flowers_args(parser)
    started = time.time()
    args.work = args.work or Path("/tmp/mgmoe_bench_pseudo_labels")
    prepare_work(args.work, {"data": str(args.data.resolve()), "seed": args.seed, "val_per_class": args.val_per_class,
                             "labelled_fraction": args.labelled_fraction}, WORK_PARTS, reuse=False)
    work, images = args.work, args.work / "images"
    truth = hide_labels(args, work)
    run(mgmoe("shards", "build", str(images / "all"), "--format", "imagefolder", "--name", "flowers12_30", "--out",
              str(work / "shards"), "--shard-size", "64", "--seed", str(args.seed), "--unlabelled",
              str(images / "unlabelled"), "--no-progress"), work / "logs" / "shards.log")
    dataset = work / "shards" / "flowers12_30"
    arms = {"labelled": train("labelled", dataset, [], args, work)}
    labelled_dataset = dataset
    pl = work / "shards" / "flowers12_30_pl"
    pl_seconds = run(mgmoe("pseudo-label", "--model", str(work / "runs" / "labelled"), "--data", str(dataset), "--out",
                           str(pl), "--no-progress"), work / "logs" / "pseudo_label.log")
    records = pseudo_records(pl)
    quality = []
    for t in THRESHOLDS:
        kept = [r for r in records if r["score"] >= t]
        right = sum(r["species"] == truth[r["stem"]] for r in kept)
        quality.append({"threshold": t, "coverage": len(kept) / len(records), "precision": right / max(1, len(kept)),
                        "kept": len(kept), "precision_se": binomial_se(right / max(1, len(kept)), max(1, len(kept)))})
    for t in args.use:
        arms[f"pseudo@{t:g}"] = train(f"pseudo@{t:g}", pl, [f"data.pseudo_min_score={t}"], args, work)
    labelled_images = len(list((images / "all" / "train").rglob("*.*")))
    scale = round((labelled_images + sum(r["score"] >= min(args.use) for r in records)) / labelled_images)
    stages = [dict(s, epochs=s["epochs"] * scale) for s in json.loads(CONFIG.read_text())["mgmoe"]["curriculum"]["stages"]]
    arms[f"labelled x{scale}"] = train(f"labelled_x{scale}", dataset, [f"curriculum.stages={json.dumps(stages)}"],
                                       args, work)
    arms[f"labelled x{scale}"]["run_name"] = f"labelled_x{scale}"
    for name, arm in arms.items():
        print(f"eval {name} ...", flush=True)
        arm["test"] = evaluate(arm.get("run_name", name), work, False)
    base = arms["labelled"]["test"]
    for name, arm in arms.items():
        if name != "labelled":
            arm["vs_labelled"] = paired(arm["test"], base)
            arm["verdict"] = verdict(arm["vs_labelled"])
    results = {"command": command_line("bench_pseudo_labels.py"),
               "labelled_dataset": str(labelled_dataset), "unlabelled": len(truth), "pseudo_label_seconds": pl_seconds,
               "quality": quality, "wall_s": time.time() - started,
               "machine": machine_record(), "arms": arms}
    out = write_results(without_per_image(results, "correct"), "pseudo_labels")
    m = results["machine"]
    print(f"\nCommand: {results['command']}\nMachine: {m['cpu']} ({m['cores']} cores), load {m['loadavg'][0]:.2f} "
          f"at end; total {results['wall_s'] / 60:.1f} min; {len(truth)} training photos unlabelled; "
          f"pseudo-label command {pl_seconds:.0f} s.\n")
    print("| threshold | coverage | precision ± SE | photos kept |\n|---:|---:|---:|---:|")
    for q in quality:
        print(f"| {q['threshold']:g} | {q['coverage']:.3f} | {q['precision']:.3f} ± {q['precision_se']:.3f} | {q['kept']} |")
    print("\n| arm | test top-1 ± SE | vs labelled only ± paired SE (points) | verdict | train min |\n|---|---:|---:|---|---:|")
    for name, arm in arms.items():
        t = arm["test"]
        c = arm.get("vs_labelled")
        diff = "-" if c is None else f"{100 * c['difference']:+.1f} ± {100 * c['standard_error']:.1f}"
        print(f"| {name} | {t['test_top1']:.3f} ± {t['test_se']:.3f} | {diff} | {arm.get('verdict', '-')} | "
              f"{arm['seconds'] / 60:.1f} |")
    print(f"\nraw results in {out}")


if __name__ == "__main__":
    main()
