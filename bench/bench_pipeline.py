"""Images/s of the mgmoe shard pipeline vs torchvision ImageFolder + DataLoader.

Both read the same JPEGs with the same timm train transform (``timm.data.create_transform(
input_size=S, is_training=True)``: random-resized crop, horizontal flip, colour jitter 0.4,
ImageNet normalisation), the same batch size and number of workers, and both hand over float32
(B, 3, S, S) normalised batches. The baseline is the standard recipe: ``ImageFolder(transform=
that timm transform)`` (PIL decode, PIL transform, ToTensor and Normalize per image) and a
``DataLoader(shuffle=True)`` (default collate). Ours reads tar shards and runs the same steps with
the same parameters and random draws on uint8 tensors (torchvision v2 kernels; JPEGs decoded by
libjpeg-turbo through simplejpeg, pixel-identical to PIL's decode, at a reduced scale when the
target resolution allows), batched inside the workers, with
ToTensor + Normalize once per batch. One "epoch" is one full pass over the set, timed from
creating the iterator to the last batch; its CPU time (main process and workers) is measured too,
which other processes' load on a shared machine disturbs less than wall time. Ours keeps its
worker processes between epochs (``make_loader``'s default); the baseline runs twice: as a new
``DataLoader`` per epoch (new workers every pass, the DataLoader default) and as one
``DataLoader(persistent_workers=True)``, so the gain from keeping workers is shown apart.
Besides the totals, each timed epoch pairs one baseline pass with the ours pass that follows it,
and the median of those per-pair speed-ups is reported (one epoch of either loader slowed by
something else on the machine then moves the median little). Two sets: the flowers12 training
images (224 px JPEGs) and a larger set made from them (re-encoded at --large-side px,
replicated to --large-count images) in a temporary folder.

    /work/venv/bin/python bench/bench_pipeline.py
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mgmoe_ds.data import build_shards, make_loader, read_listing  # noqa: E402


def make_large_set(flowers: Path, out: Path, count: int, side: int) -> Path:
    """``count`` JPEGs of ``side`` px, upscaled (and slightly cropped) copies of flowers12."""
    sources = sorted(flowers.glob("*/*/*.jpg"))
    for index in range(count):
        src = sources[index % len(sources)]
        image = Image.open(src).convert("RGB")
        shift = (index // len(sources)) * 3  # each copy is a different crop, so bytes differ
        image = image.crop((shift, shift, image.width - shift, image.height - shift)).resize((side, side), Image.BICUBIC)
        folder = out / src.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.jpg", quality=90)
    return out


def cpu_seconds() -> float:
    """CPU time of this process and of its children (the DataLoader workers): finished ones from
    ``getrusage``, running ones (persistent workers) from their ``/proc/<pid>/stat``."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    running, me = 0, str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # fields 3 (state) onwards
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
        if fields[1] == me:  # field 4: the parent's pid
            running += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime, in ticks
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
            + running / os.sysconf("SC_CLK_TCK"))


def time_epoch(iterable) -> tuple[float, float, int]:
    """Wall seconds and CPU seconds (main process and workers) for one pass over ``iterable``,
    and the images it gave; the workers have exited when the pass ends."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    images = sum(int(batch[0].shape[0]) if isinstance(batch, (list, tuple)) else int(batch["images"].shape[0])
                 for batch in iterable)
    return time.perf_counter() - start, cpu_seconds() - start_cpu, images


def bench(folder: Path, shards: Path, img_size: int, args: argparse.Namespace) -> dict[str, float]:
    """Images/s and CPU ms per image of the baselines and of ours over ``args.epochs`` timed
    epochs each, taken in turns (baseline, baseline with persistent workers, ours, baseline, ...)
    after one untimed warm-up epoch each, so that a change in the machine's load hits all alike.

    The plain baseline is a new ``DataLoader`` per epoch (new worker processes every pass, the
    DataLoader default); the second baseline keeps one ``DataLoader(persistent_workers=True)``,
    as ours keeps its workers by default (``make_loader(persistent_workers=True)``).
    """
    baseline = ImageFolder(str(folder), transform=create_transform(input_size=img_size, is_training=True))
    kept_baseline = DataLoader(baseline, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                               persistent_workers=True, generator=torch.Generator().manual_seed(0))
    loader, _ = make_loader(shards, "train", batch_size=args.batch_size, img_size=img_size, train=True,
                            num_workers=args.workers, shuffle_buffer=args.shuffle_buffer)
    names = ("base", "kept", "ours")
    totals = {f"{name}_{kind}": 0.0 for name in names for kind in ("s", "cpu")}
    pair_ratios: dict[str, list[float]] = {"base": [], "kept": [], "base_cpu": []}
    for epoch in range(args.epochs + 1):
        base = time_epoch(DataLoader(baseline, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                     generator=torch.Generator().manual_seed(epoch)))
        kept = time_epoch(kept_baseline)
        loader.set_epoch(epoch)
        ours = time_epoch(loader)
        assert base[2] == kept[2] == ours[2], (base[2], kept[2], ours[2])
        if epoch > 0:  # epoch 0 warms the page cache, the allocator and starts the kept workers
            for name, (seconds, cpu, _) in zip(names, (base, kept, ours)):
                totals[f"{name}_s"] += seconds
                totals[f"{name}_cpu"] += cpu
            pair_ratios["base"].append(base[0] / ours[0])
            pair_ratios["kept"].append(kept[0] / ours[0])
            pair_ratios["base_cpu"].append(base[1] / ours[1])
    images = base[2] * args.epochs
    return {"base": images / totals["base_s"], "kept": images / totals["kept_s"], "ours": images / totals["ours_s"],
            "base_cpu_ms": 1e3 * totals["base_cpu"] / images, "ours_cpu_ms": 1e3 * totals["ours_cpu"] / images,
            "pair_median": statistics.median(pair_ratios["base"]), "pair_min": min(pair_ratios["base"]),
            "kept_pair_median": statistics.median(pair_ratios["kept"]),
            "pair_cpu_median": statistics.median(pair_ratios["base_cpu"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flowers", type=Path, default=Path("/work/shared/data/flowers12"))
    parser.add_argument("--large-count", type=int, default=2000, help="images in the large set (0: flowers12 only)")
    parser.add_argument("--large-side", type=int, default=640)
    parser.add_argument("--img-sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard (>= workers shards needed)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="timed epochs per loader, after a warm-up one (mean reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {
            f"flowers12 train ({len(list((args.flowers / 'train').glob('*/*.jpg')))} JPEGs, 224 px)":
                (args.flowers / "train", args.flowers),
        }
        if args.large_count > 0:
            large = make_large_set(args.flowers, tmp / "large", args.large_count, args.large_side)
            sets[f"flowers12 x{args.large_count // 960 + 1} re-encoded ({args.large_count} JPEGs, "
                 f"{args.large_side} px)"] = (large, large)
        rows = []
        for label, (folder, src) in sets.items():
            listing = read_listing("imagefolder", src, {"train": 1.0}, seed=0)
            shards = build_shards(listing, tmp / "shards", f"set{len(rows)}", source=str(src),
                                  shard_size=args.shard_size, progress=False)
            for img_size in args.img_sizes:
                load_before = os.getloadavg()[0]
                result = bench(folder, shards, img_size, args)
                load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
                rows.append((label, img_size, result, load))
                print(f"{label} @ {img_size}px: ImageFolder {result['base']:.0f} img/s "
                      f"({result['kept']:.0f} with persistent workers), ours {result['ours']:.0f} img/s, "
                      f"{result['ours'] / result['base']:.2f}x ({result['ours'] / result['kept']:.2f}x); CPU ms/image {result['base_cpu_ms']:.2f} vs "
                      f"{result['ours_cpu_ms']:.2f}; per-epoch pairs median {result['pair_median']:.2f}x "
                      f"(min {result['pair_min']:.2f}x) (load average {load})", flush=True)
    print(f"\nmachine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"workers {args.workers}, batch {args.batch_size}, shard size {args.shard_size}, timm train transform, "
          f"{args.epochs} timed epochs each after a warm-up, in turns (totals over all epochs; per-epoch pairs)\n")
    print("| set | img_size | ImageFolder + DataLoader (img/s) | mgmoe shards (img/s) | ratio (totals) | "
          "ratio per-epoch pairs, median (min) | ImageFolder, persistent workers (img/s) | ours / it (totals; "
          "pairs median) | CPU ms/image ImageFolder / ours | CPU-time ratio (totals; pairs median) | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, img_size, result, load in rows:
        print(f"| {label} | {img_size} | {result['base']:.0f} | {result['ours']:.0f} | "
              f"{result['ours'] / result['base']:.2f}x | {result['pair_median']:.2f}x ({result['pair_min']:.2f}x) | "
              f"{result['kept']:.0f} | {result['ours'] / result['kept']:.2f}x; {result['kept_pair_median']:.2f}x | "
              f"{result['base_cpu_ms']:.2f} / {result['ours_cpu_ms']:.2f} | "
              f"{result['base_cpu_ms'] / result['ours_cpu_ms']:.2f}x; {result['pair_cpu_median']:.2f}x | {load} |")


if __name__ == "__main__":
    main()
