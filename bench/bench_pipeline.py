"""Images/s of the mgmoe shard pipeline vs torchvision ImageFolder + DataLoader.

Both read the same JPEGs with the same timm transform, batch size and number of workers; one
"epoch" is one full pass over the set, timed from creating the iterator to the last batch
(worker start-up included for both). Two sets: the flowers12 training images (224 px JPEGs) and
a larger set made from them (re-encoded at --large-side px, replicated to --large-count images)
in a temporary folder. Our pipeline decodes JPEGs at a reduced scale (PIL draft) when the target
resolution allows; that is part of what is measured.

    /work/venv/bin/python bench/bench_pipeline.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mgmoe_ds.data import build_shards, create_transform, make_loader, read_listing  # noqa: E402


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


def time_epochs(make_iterable, epochs: int) -> tuple[float, int]:
    """Mean seconds per epoch and images per epoch."""
    seconds, images = [], 0
    for epoch in range(epochs):
        start = time.perf_counter()
        images = sum(int(batch[0].shape[0]) if isinstance(batch, (list, tuple)) else int(batch["images"].shape[0])
                     for batch in make_iterable(epoch))
        seconds.append(time.perf_counter() - start)
    return sum(seconds) / len(seconds), images


def bench(folder: Path, shards: Path, img_size: int, args: argparse.Namespace) -> tuple[float, float]:
    transform = create_transform(img_size, train=True)
    baseline = ImageFolder(str(folder), transform=transform)

    def baseline_epoch(epoch):
        return DataLoader(baseline, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                          generator=torch.Generator().manual_seed(epoch))

    loader, _ = make_loader(shards, "train", batch_size=args.batch_size, img_size=img_size, train=True,
                            num_workers=args.workers, shuffle_buffer=args.shuffle_buffer)

    def ours_epoch(epoch):
        loader.set_epoch(epoch)
        return loader

    base_s, base_n = time_epochs(baseline_epoch, args.epochs)
    ours_s, ours_n = time_epochs(ours_epoch, args.epochs)
    assert base_n == ours_n, (base_n, ours_n)
    return base_n / base_s, ours_n / ours_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flowers", type=Path, default=Path("/work/shared/data/flowers12"))
    parser.add_argument("--large-count", type=int, default=2000)
    parser.add_argument("--large-side", type=int, default=640)
    parser.add_argument("--img-sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard (>= workers shards needed)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader (mean reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        large = make_large_set(args.flowers, tmp / "large", args.large_count, args.large_side)
        sets = {
            f"flowers12 train ({len(list((args.flowers / 'train').glob('*/*.jpg')))} JPEGs, 224 px)":
                (args.flowers / "train", args.flowers),
            f"flowers12 x{args.large_count // 960 + 1} re-encoded ({args.large_count} JPEGs, {args.large_side} px)":
                (large, large),
        }
        rows = []
        for label, (folder, src) in sets.items():
            listing = read_listing("imagefolder", src, {"train": 1.0}, seed=0)
            shards = build_shards(listing, tmp / "shards", f"set{len(rows)}", source=str(src),
                                  shard_size=args.shard_size, progress=False)
            for img_size in args.img_sizes:
                base, ours = bench(folder, shards, img_size, args)
                rows.append((label, img_size, base, ours))
                print(f"{label} @ {img_size}px: ImageFolder {base:.0f} img/s, ours {ours:.0f} img/s, {ours / base:.2f}x",
                      flush=True)
    print(f"\nmachine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"workers {args.workers}, batch {args.batch_size}, shard size {args.shard_size}, timm train transform, {args.epochs} timed epochs (mean)\n")
    print("| set | img_size | ImageFolder + DataLoader (img/s) | mgmoe shards (img/s) | ratio |")
    print("|---|---|---|---|---|")
    for label, img_size, base, ours in rows:
        print(f"| {label} | {img_size} | {base:.0f} | {ours:.0f} | {ours / base:.2f}x |")


if __name__ == "__main__":
    main()
