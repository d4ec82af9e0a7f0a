"""``mgmoe eval``, ``mgmoe ablate``, ``mgmoe export``, ``mgmoe predict`` and ``mgmoe pseudo-label``:
using a trained model.

Every command runs in one process (no launcher, no process group) on a run folder written at
any expert-parallel size, or (eval, ablate, predict, pseudo-label) on an exported ``.safetensors`` file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``eval``, ``ablate``, ``export``, ``predict`` and ``pseudo-label`` to the ``mgmoe`` parser."""
    evaluate = subparsers.add_parser("eval", help="accuracy, long-tail, efficiency and routing report")
    _common(evaluate)
    evaluate.add_argument("--out", type=Path, default=None, help="report folder (default RUN/eval)")
    evaluate.add_argument("--head-min", type=float, default=None,
                          help="training images per class from which a class is 'head' (default: upper tertile)")
    evaluate.add_argument("--tail-max", type=float, default=None,
                          help="training images per class up to which a class is 'tail' (default: lower tertile)")
    evaluate.add_argument("--max-points", type=int, default=2000, help="images in the t-SNE figure")
    evaluate.add_argument("--compare", type=Path, default=None, metavar="RUN",
                          help="another run folder or export of the same classes (e.g. trained without the box "
                               "task): top-1 of both on the same images, with the paired standard error")
    evaluate.set_defaults(func=run_eval)

    ablate = subparsers.add_parser("ablate", help="accuracy and FLOPs for K = 1..E and every subset of experts")
    _common(ablate)
    ablate.add_argument("--out", type=Path, default=None, help="output folder (default RUN/ablation)")
    ablate.add_argument("--subset-k", type=int, default=None,
                        help="experts fused within a subset (default: all of the subset)")
    ablate.add_argument("--min-subset-size", type=int, default=1, help="smallest subset (default %(default)s: "
                        "each expert alone too)")
    ablate.set_defaults(func=run_ablate)

    export = subparsers.add_parser("export", help="consolidate a checkpoint into one .safetensors file")
    export.add_argument("--checkpoint", required=True, type=Path, help="run folder (any expert-parallel size)")
    export.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/last_good.json)")
    export.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    export.set_defaults(func=run_export)

    predict = subparsers.add_parser("predict", help="top-5 species, routed experts and the box, one JSON line per image")
    predict.add_argument("--model", required=True, type=Path, help="an exported .safetensors file (or a run folder)")
    predict.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--crops", type=Path, default=None, metavar="DIR",
                         help="write each image cropped to its predicted box here (models with a box tower)")
    predict.set_defaults(func=run_predict)

    pseudo = subparsers.add_parser("pseudo-label", help="label a dataset's unlabelled split with a pair network on "
                                   "the model's features; write it as pseudo-labelled training shards")
    pseudo.add_argument("--model", required=True, type=Path, help="run folder or exported .safetensors file, trained "
                        "on the dataset's classes")
    pseudo.add_argument("--data", required=True, type=Path, help="dataset folder with a train and an unlabelled split")
    pseudo.add_argument("--out", required=True, type=Path, help="the new dataset folder (its name is the dataset's)")
    pseudo.add_argument("--threshold", type=float, default=0.0, help="write only pseudo-labels scored at least this, "
                        "in [0, 1] (default %(default)s: all; data.pseudo_min_score can still leave some out)")
    pseudo.add_argument("--overwrite", action="store_true", help="replace an existing --out dataset")
    pseudo.add_argument("--steps", type=int, default=500, help="pair network training steps")
    pseudo.add_argument("--batch-pairs", type=int, default=256, help="pairs per step, half of them the same species")
    pseudo.add_argument("--lr", type=float, default=1e-3, help="pair network learning rate")
    pseudo.add_argument("--exemplars", type=int, default=10, help="labelled images per class (nearest its mean) "
                        "each unlabelled image is compared with")
    pseudo.add_argument("--seed", type=int, default=0, help="seed of the pair network and its pairs")
    pseudo.add_argument("--shard-size", type=int, default=None, help="most samples per pseudo-labelled shard "
                        "(default: the input's largest train shard)")
    pseudo.add_argument("--batch-size", type=int, default=32)
    pseudo.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    pseudo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    pseudo.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    pseudo.set_defaults(func=run_pseudo_label)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="run folder or exported .safetensors file")
    parser.add_argument("--data", default=None, help="dataset folder (default: the run's dataset)")
    parser.add_argument("--split", default="test", help="split to evaluate (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")


def run_eval(args: argparse.Namespace) -> int:
    from mgmoe_ds.evaluation import EvalArgs, evaluate_model

    report = evaluate_model(EvalArgs(checkpoint=args.checkpoint, data=args.data, out=args.out, split=args.split,
                                     batch_size=args.batch_size, num_workers=args.num_workers,
                                     head_min=args.head_min, tail_max=args.tail_max, max_points=args.max_points,
                                     compare=args.compare,
                                     progress=not args.no_progress, device=args.device))
    print(f"top-1 {report['accuracy']['top1']:.4f}, top-5 {report['accuracy']['top5']:.4f} on "
          f"{report['images']} images", file=sys.stderr)
    if report.get("boxes"):
        boxes = report["boxes"]
        print(f"boxes: mean IoU {boxes['mean_iou']:.3f}, IoU>=0.5 {boxes['iou50']:.3f} on "
              f"{boxes['images_with_box']} images (mean-box baseline {boxes['mean_box_baseline']['mean_iou']:.3f})",
              file=sys.stderr)
    if report.get("compare"):
        from mgmoe_ds.evaluation.boxes import comparison_sentence

        print(comparison_sentence(report["compare"]), file=sys.stderr)
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from mgmoe_ds.ablate import AblateArgs, ablate_model

    report = ablate_model(AblateArgs(checkpoint=args.checkpoint, data=args.data, out=args.out, split=args.split,
                                     batch_size=args.batch_size, num_workers=args.num_workers,
                                     subset_k=args.subset_k, min_subset_size=args.min_subset_size,
                                     progress=not args.no_progress,
                                     device=args.device))
    print(f"{len(report['rows'])} rows on {report['images']} images", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from mgmoe_ds.export import export_model

    path = export_model(args.checkpoint, args.out, tag=args.tag)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from mgmoe_ds.inference import load_trained
    from mgmoe_ds.predict import expand_inputs, predict_files

    model, meta = load_trained(args.model)
    failed = 0
    if args.crops is not None and model.box_tower is None:
        print(f"error: --crops {args.crops}: the model {args.model} has no box tower (train it with "
              f"mgmoe.model.tasks.bbox)", file=sys.stderr)
        return 2
    for record in predict_files(model, meta, expand_inputs(args.inputs), batch_size=args.batch_size,
                                crops_dir=args.crops):
        failed += "error" in record
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


def run_pseudo_label(args: argparse.Namespace) -> int:
    from mgmoe_ds.pseudo_label_data import PseudoLabelArgs, pseudo_label_dataset, summary_lines

    stats = pseudo_label_dataset(PseudoLabelArgs(
        model=args.model, data=args.data, out=args.out, threshold=args.threshold, overwrite=args.overwrite,
        steps=args.steps, batch_pairs=args.batch_pairs, lr=args.lr, exemplars_per_class=args.exemplars,
        seed=args.seed, batch_size=args.batch_size, num_workers=args.num_workers, shard_size=args.shard_size,
        progress=not args.no_progress, device=args.device))
    print("\n".join(summary_lines(stats)))
    return 0
