"""``mgmoe shards {build,verify,register,demo}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .demo import build_demo
from .formats import FORMATS, VALIDATION_FRACTION, carve_validation, parse_split_fractions, read_class_file, read_listing
from .registry import DEFAULT_REGISTRY, register_dataset
from .shards import build_shards, check_dataset_name, load_manifest
from .unlabelled import read_unlabelled, with_unlabelled
from .verify import verify_dataset


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``shards`` and its sub-commands to the ``mgmoe`` parser."""
    shards = subparsers.add_parser("shards", help="build, verify and register webdataset shards")
    commands = shards.add_subparsers(dest="shards_command", required=True, metavar="SHARDS_COMMAND")

    build = commands.add_parser("build", help="write DIR/NAME/NAME-{split}-NNNNNN.tar and manifest.json")
    build.add_argument("src", type=Path, help="dataset folder (imagefolder, cub) or CSV file (csv)")
    build.add_argument("--format", required=True, choices=FORMATS)
    build.add_argument("--name", required=True, help="dataset name: letters, digits, '_' and '-'")
    build.add_argument("--out", required=True, type=Path, help="parent folder of the dataset folder")
    build.add_argument("--split", default="train=0.8,val=0.1,test=0.1",
                       help="stratified split fractions when the source has none (default %(default)s)")
    build.add_argument("--val-fraction", type=float, default=VALIDATION_FRACTION,
                       help="when the source has no validation split (CUB, a CSV, train/test folders), carve this "
                            "share of each species' training images into one, seeded (default %(default)s)")
    build.add_argument("--no-val-split", action="store_true", help="do not carve a validation split")
    build.add_argument("--seed", type=int, default=0, help="seed of the split and the shard order")
    build.add_argument("--shard-size", type=int, default=1000, help="most samples per shard")
    build.add_argument("--max-side", type=int, default=None, help="resize and re-encode larger images")
    build.add_argument("--classes", type=Path, default=None, help="class list, one name per line, in index order")
    build.add_argument("--unlabelled", type=Path, default=None, metavar="PATH",
                       help="also write an 'unlabelled' split (no cls) from PATH: a folder of images, flat or nested "
                            "(not class folders), or a CSV with a path column and no labels")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.set_defaults(func=run_build)

    verify = commands.add_parser("verify", help="check checksums, counts and decoding against the manifest")
    verify.add_argument("dataset", type=Path, help="the dataset folder DIR/NAME")
    verify.add_argument("--no-progress", action="store_true")
    verify.set_defaults(func=run_verify)

    register = commands.add_parser("register", help="add a dataset to the registry (append-only label space)")
    register.add_argument("dataset", type=Path, help="the dataset folder DIR/NAME")
    register.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry file (default %(default)s)")
    register.set_defaults(func=run_register)

    demo = commands.add_parser("demo", help="generate the synthetic fine-grained birds as shards")
    demo.add_argument("--out", required=True, type=Path)
    demo.add_argument("--name", default="demo_birds")
    demo.add_argument("--num-classes", type=int, default=12)
    demo.add_argument("--train-images", type=int, default=1200, help="about this many, long-tailed")
    demo.add_argument("--val-per-class", type=int, default=10)
    demo.add_argument("--test-per-class", type=int, default=15)
    demo.add_argument("--imbalance", type=float, default=10.0, help="most / least frequent class in train")
    demo.add_argument("--image-size", type=int, default=96)
    demo.add_argument("--shard-size", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)


def run_build(args: argparse.Namespace) -> int:
    check_dataset_name(args.name)
    fractions = parse_split_fractions(args.split)
    classes = read_class_file(args.classes) if args.classes is not None else None
    listing = read_listing(args.format, args.src, fractions, args.seed, classes)
    carved = 0
    if not args.no_val_split:
        listing, carved = carve_validation(listing, args.val_fraction, args.seed, str(args.src))
    if args.unlabelled is not None:
        listing = with_unlabelled(listing, *read_unlabelled(args.unlabelled))
    options = {"format": args.format, "split": args.split, "seed": args.seed, "shard_size": args.shard_size,
               "max_side": args.max_side, "classes": str(args.classes) if args.classes else None,
               "val_fraction": None if args.no_val_split else args.val_fraction, "val_carved": carved,
               "unlabelled": str(args.unlabelled) if args.unlabelled is not None else None}
    out_dir = build_shards(listing, args.out, args.name, source=str(args.src), shard_size=args.shard_size,
                           max_side=args.max_side, seed=args.seed, options=options, progress=not args.no_progress)
    counts = {split: table["total"] for split, table in load_manifest(out_dir)["counts"].items()}
    print(f"wrote {out_dir} ({len(listing.classes)} classes; " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")
    if carved:
        print(f"carved a validation split from train: {carved} images ({args.val_fraction:g} of each species' "
              f"training images, at least one, seed {args.seed}); it fits the routing teacher, never the test split")
    elif "val" not in counts:
        print("no validation split: training needs one (data.val_split); rebuild without --no-val-split")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    problems = verify_dataset(args.dataset, progress=not args.no_progress)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{args.dataset}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def run_register(args: argparse.Namespace) -> int:
    registry = register_dataset(args.dataset, args.registry)
    print(f"{args.registry}: {len(registry['datasets'])} dataset(s), {len(registry['classes'])} species")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    out_dir = build_demo(args.out, name=args.name, num_classes=args.num_classes, train_images=args.train_images,
                         val_per_class=args.val_per_class, test_per_class=args.test_per_class,
                         imbalance=args.imbalance, image_size=args.image_size, shard_size=args.shard_size,
                         seed=args.seed)
    print(f"wrote {out_dir}")
    return 0
