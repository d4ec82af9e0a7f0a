"""Epoch time of a frozen-backbone stage (the residual stage) with the feature cache vs without it.

One process, one DeepSpeed engine, the trainer's own step (``train.step.TrainStep``) on the
same data, model and stage: an uncached epoch (decode, transform, backbone, head, backward,
step for every batch) against a cached epoch (cached features, head, backward, step). The
cache's one-off build (one eval pass of the backbone over the training set) and a reuse (the
hash of the backbone weights and the manifest) are timed separately. Default model: the
``ds_configs/zero2.json`` block (EfficientNet-Lite0 at 96 px, four experts, batch 32) on demo
birds generated in a temporary folder.

    /work/venv/bin/python bench/bench_feature_cache.py --train-images 256 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mgmoe_ds.config import StageConfig  # noqa: E402
from mgmoe_ds.curriculum import create_stage  # noqa: E402
from mgmoe_ds.data import build_demo  # noqa: E402
from mgmoe_ds.train.trainer import TrainArgs, Trainer  # noqa: E402

TARGET = 5.0  # the target: a cached epoch at least this many times faster


def timed_epoch(trainer: Trainer, engine, step, batches) -> tuple[float, int]:
    """Seconds and steps of one pass of ``batches`` through the trainer's step."""
    trainer.model.train()
    trainer.model.backbone.eval()  # frozen, as the trainer keeps it
    started, steps = time.perf_counter(), 0
    for batch in batches:
        step(engine, batch, trainer.clusters)
        steps += 1
    return time.perf_counter() - started, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "ds_configs" / "zero2.json")
    parser.add_argument("--train-images", type=int, default=256, help="demo birds training images")
    parser.add_argument("--image-size", type=int, default=96, help="demo JPEG side in pixels")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of each path (interleaved)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="mgmoe key=value override")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "feature_cache.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        dataset = build_demo(Path(tmp) / "data", name="bench_birds", num_classes=12, train_images=args.train_images,
                             val_per_class=4, test_per_class=1, image_size=args.image_size, shard_size=64, seed=0)
        trainer = Trainer(TrainArgs(deepspeed_config=args.config, data=str(dataset), output=Path(tmp) / "run",
                                    overrides=["cache.mode=auto", *args.overrides]))
        stages = trainer.config.curriculum.stages
        stage_index = next((i for i, s in enumerate(stages) if s.name == "residual"), None)
        if stage_index is None:
            raise SystemExit(f"{args.config}: no residual stage to time")
        stage = create_stage(StageConfig("residual", epochs=1, lr=stages[stage_index].lr), trainer.config,
                             trainer.base_lr)
        assert not stage.trains_backbone, "the timed stage must freeze the backbone"
        trainer.stage, trainer.stage_index = stage, stage_index
        trainer.progress.start_stage(stage_index)
        trainer.recompute_clusters()  # the residual stage's frozen routing
        steps_uncached, _ = trainer.plan(stage, stage_index, cached=False)
        steps_cached, _ = trainer.plan(stage, stage_index, cached=True)
        engine, step = trainer.engine_for(stage, (steps_uncached + steps_cached) * args.epochs)
        step.routing = stage.routing(trainer.clusters)

        def uncached_epoch(epoch: int) -> tuple[float, int]:
            trainer.data.train_loader.set_epoch(epoch)
            return timed_epoch(trainer, engine, step, trainer.comm.agreed(trainer.data.train_loader, pad=False))

        def cached_epoch(epoch: int) -> tuple[float, int]:
            return timed_epoch(trainer, engine, step, trainer.features.cached_batches(cache, epoch, steps_cached))

        uncached, cached = [uncached_epoch(0)], []
        started = time.perf_counter()
        cache = trainer.features.train_cache(stage)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        assert trainer.features.train_cache(stage) is cache
        reuse_s = time.perf_counter() - started
        cached.append(cached_epoch(0))
        for epoch in range(1, args.epochs):  # interleaved, so load from other sessions hits both paths
            uncached.append(uncached_epoch(epoch))
            cached.append(cached_epoch(epoch))
        engine.destroy()
        record = trainer.features.record

    load_after = os.getloadavg()
    # The least-disturbed epoch of each path: other sessions' load only ever adds time.
    uncached_s = min(s for s, _ in uncached)
    cached_s = min(s for s, _ in cached)
    speedup = uncached_s / cached_s
    model = trainer.config.model
    result = {
        "backbone": model.backbone, "img_size": model.img_size, "experts": [e.name for e in model.experts],
        "batch": trainer.micro_batch, "train_images": args.train_images, "epochs_timed": args.epochs,
        "steps_uncached": uncached[0][1], "steps_cached": cached[0][1], "uncached_epoch_s": uncached_s,
        "cached_epoch_s": cached_s, "uncached_epochs_s": [s for s, _ in uncached],
        "cached_epochs_s": [s for s, _ in cached], "speedup": speedup, "cache_build_s": build_s,
        "cache_reuse_s": reuse_s,
        "cache": record, "load_before": load_before, "load_after": load_after,
    }
    print(json.dumps(result, indent=2))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "feature_cache.json").write_text(json.dumps(result, indent=2))

    def amortised(epochs: int) -> float:
        return epochs * uncached_s / (build_s + epochs * cached_s)

    command = "cd /work/main && /work/venv/bin/python bench/bench_feature_cache.py " + " ".join(sys.argv[1:])
    verdict = "met" if speedup >= TARGET else "NOT met"
    lines = [
        "## Feature cache: frozen-backbone (residual) stage epoch, cached vs uncached",
        "",
        f"Command (one run, every number below): `{command.strip()}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, torch "
        f"{torch.__version__}; shared with other sessions' tests and benchmarks during the run (load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after), so absolute times are noisy.",
        f"Model: `{model.backbone}` at {model.img_size} px, experts {', '.join(e.name for e in model.experts)}, "
        f"top-{trainer.config.moe.top_k}, batch {trainer.micro_batch}, ZeRO stage "
        f"{trainer.ds_config.get('zero_optimization', {}).get('stage', 0)}; residual stage (router + expert "
        f"heads train, backbone frozen, cluster-level routing). Data: {args.train_images} demo-bird JPEGs "
        f"({args.image_size} px), {trainer.config.data.num_workers} loader worker(s). Both paths run the "
        f"trainer's `TrainStep` (forward through the DeepSpeed engine, backward, optimizer step); the "
        f"uncached epoch also decodes, transforms and runs the backbone. {args.epochs} epoch(s) of each path, "
        f"interleaved; the table shows each path's fastest epoch (all: uncached "
        f"{', '.join(f'{s:.2f}' for s, _ in uncached)} s; cached {', '.join(f'{s:.2f}' for s, _ in cached)} s).",
        "",
        "| path | steps/epoch | epoch (s) | vs uncached |",
        "|---|---|---|---|",
        f"| uncached (images -> backbone -> head) | {uncached[0][1]} | {uncached_s:.2f} | 1.00x |",
        f"| cached ({record['dtype']}, {record['storage']}) | {cached[0][1]} | {cached_s:.2f} | {speedup:.1f}x |",
        "",
        f"- Cache build (one eval pass of the backbone, once per backbone/transform/dataset): {build_s:.2f} s; "
        f"reuse by a later stage (key hash only): {reuse_s:.2f} s.",
        f"- Including the build: {amortised(1):.1f}x for a one-epoch stage, {amortised(2):.1f}x for two epochs "
        f"(the length of zero2.json's residual stage), {amortised(10):.1f}x for ten.",
        f"- Target (>= {TARGET:.0f}x per epoch): {verdict} at this size.",
        "",
    ]
    args.output.write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
