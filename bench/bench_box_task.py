"""Issue 17 benchmark: the box task on the demo birds (synthetic boxes), same budget with and without it.

Trains the README's job (``jobs/train.py --deepspeed ds_configs/zero2.json``: EfficientNet-Lite0
ImageNet weights, 96 px, the config's curriculum) twice on the embedded demo birds, once as it is
and once with ``--set model.tasks.bbox=true`` (the box tower on the backbone tokens, complete-IoU,
weight 1), same seed and epochs. Then ``mgmoe eval --checkpoint BOXES --compare PLAIN`` on the
test split reports the tower's mean IoU and IoU@0.5 against the split's mean true box (the
baseline), and the top-1 of both models on the same images with the paired standard error.
Markdown on stdout; ``bench/results/box_task[_seed<S>].json``.

Usage::

    PYTHONPATH=. python bench/bench_box_task.py            # ~12 min on 2 cores
    PYTHONPATH=. python bench/bench_box_task.py --seed 1   # another seed (init, data order)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from bench_transfer import run
from machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "ds_configs" / "zero2.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mgmoe_bench_box_task"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for arm, extra in (("plain", []), ("boxes", ["--set", "model.tasks.bbox=true"])):
        folder = args.work / f"{arm}_seed{args.seed}"
        command = [sys.executable, "jobs/train.py", "--deepspeed", str(CONFIG), "--output", str(folder),
                   "--set", f"train.seed={args.seed}", *extra]
        print(f"training {arm}: {' '.join(command)}", file=sys.stderr)
        seconds[arm] = run(command, args.work / f"{arm}_seed{args.seed}.log")
    report_dir = args.work / f"eval_seed{args.seed}"
    run([sys.executable, "-m", "mgmoe_ds.cli", "eval", "--checkpoint", str(args.work / f"boxes_seed{args.seed}"),
         "--compare", str(args.work / f"plain_seed{args.seed}"), "--split", args.split, "--out", str(report_dir),
         "--no-progress"], args.work / f"eval_seed{args.seed}.log")
    report = json.loads((report_dir / "report.json").read_text())
    boxes, compare = report["boxes"], report["compare"]
    result = {
        "command": "PYTHONPATH=. python bench/bench_box_task.py" + (f" --seed {args.seed}" if args.seed else ""),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "split": args.split, "seed": args.seed, "train_seconds": seconds, "boxes": boxes, "compare": compare,
    }
    out = ROOT / "bench" / "results" / ("box_task.json" if args.seed == 0 else f"box_task_seed{args.seed}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    base = boxes["mean_box_baseline"]
    n = boxes["images_with_box"]
    print(f"\nDemo birds, {args.split} split, seed {args.seed} ({result['machine']['cpu']}, {os.cpu_count()} cores)\n")
    print("| box predictor | mean IoU | IoU >= 0.5 % | images |")
    print("|---|---:|---:|---:|")
    print(f"| box tower | {boxes['mean_iou']:.3f} | {100 * boxes['iou50']:.1f} ± {100 * boxes['iou50_standard_error']:.1f} "
          f"| {n} |")
    print(f"| the split's mean true box (baseline) | {base['mean_iou']:.3f} | {100 * base['iou50']:.1f} | {n} |")
    print(f"\n| model | top-1 % | train min |\n|---|---:|---:|")
    print(f"| without the box task | {100 * compare['other_top1']:.2f} | {seconds['plain'] / 60:.1f} |")
    print(f"| with the box task | {100 * compare['top1']:.2f} | {seconds['boxes'] / 60:.1f} |")
    gap, se = 100 * compare["difference"], 100 * compare["standard_error"]
    print(f"\nDifference {gap:+.2f} points, paired standard error {se:.2f} on {compare['images']} images: "
          f"{'a tie' if compare['tie'] else 'beyond one standard error'}.")


if __name__ == "__main__":
    main()
