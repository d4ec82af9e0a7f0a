"""The streaming pipeline: epochs over ranks and workers, resampling, balance, skips, registry labels."""

from __future__ import annotations

import io
import json
import math
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image

from mgmoe_ds.data import DataError, make_loader, register_dataset
from mgmoe_ds.data.shards import SHARD_MTIME, load_manifest
from mgmoe_ds.data.transforms import decode_image
from test_data_shards import image_bytes, make_dataset, stock_samples

CLASSES = ["kite", "hawk", "falcon"]


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    """45 training samples (long-tailed: 30/10/5) in 7 shards, and 6 validation samples."""
    labels = [0] * 30 + [1] * 10 + [2] * 5
    labels = labels[::2] + labels[1::2]  # mix classes across shards
    return make_dataset(tmp_path_factory.mktemp("birds"), "birds", {"train": labels, "val": [0, 1, 2] * 2},
                        CLASSES, shard_size=7)


def epoch_keys(dataset, epoch, world_size=2, num_workers=2, **kw):
    keys_by_rank, batches_by_rank = [], []
    for rank in range(world_size):
        loader, info = make_loader(dataset, "train", batch_size=4, img_size=32, train=True, rank=rank,
                                   world_size=world_size, num_workers=num_workers, epoch_seed=5, **kw)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        keys_by_rank.append([k for b in batches for k in b["keys"]])
        batches_by_rank.append(batches)
        assert len(keys_by_rank[-1]) == info.samples_per_rank[rank]
    return keys_by_rank, batches_by_rank, info


def test_every_sample_exactly_once_per_epoch_over_2_ranks_x_2_workers(birds):
    all_keys = {s["__key__"] for s in stock_samples(birds) if s["__key__"].startswith("birds_train")}
    orders = []
    for epoch in (0, 1):
        keys_by_rank, batches_by_rank, info = epoch_keys(birds, epoch)
        flat = [k for keys in keys_by_rank for k in keys]
        assert len(flat) == len(set(flat)) == info.num_samples == 45
        assert set(flat) == all_keys
        batch = batches_by_rank[0][0]
        assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.float32
        assert batch["labels"].dtype == torch.long
        orders.append(keys_by_rank[0])
    assert orders[0] != orders[1]  # shard order and shuffle buffer are reseeded per epoch
    assert sorted(orders[0]) == sorted(orders[1])  # ranks keep their shards across epochs


def test_persistent_workers_give_each_epoch_the_same_batches_as_fresh_workers(birds):
    """Workers kept between epochs see set_epoch (shard order, shuffle, augmentation draws)."""
    def batches(loader, epoch):
        loader.set_epoch(epoch)
        return [(tuple(b["keys"]), b["images"]) for b in loader]

    kept, _ = make_loader(birds, "train", batch_size=4, img_size=32, train=True, num_workers=2, epoch_seed=3)
    assert kept.persistent_workers
    kept_epochs = [batches(kept, epoch) for epoch in (0, 1)]
    for epoch, kept_batches in zip((0, 1), kept_epochs):
        fresh, _ = make_loader(birds, "train", batch_size=4, img_size=32, train=True, num_workers=2, epoch_seed=3,
                               persistent_workers=False)
        fresh_batches = batches(fresh, epoch)
        assert [keys for keys, _ in kept_batches] == [keys for keys, _ in fresh_batches]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(kept_batches, fresh_batches))
    assert [k for k, _ in kept_epochs[0]] != [k for k, _ in kept_epochs[1]]
    # Leaving an epoch early and starting the next one gives that whole next epoch.
    kept.set_epoch(2)
    next(iter(kept))
    assert sum(len(keys) for keys, _ in batches(kept, 3)) == 45


def test_labels_match_the_stored_class(birds):
    species = {s["__key__"]: json.loads(s["json"])["species"] for s in stock_samples(birds)}
    loader, info = make_loader(birds, "train", batch_size=8, img_size=32, train=False)
    pairs = [(k, int(l)) for b in loader for k, l in zip(b["keys"], b["labels"])]
    assert len(pairs) == 45 and all(info.class_names[label] == species[key] for key, label in pairs)
    assert info.class_counts == [30, 10, 5] and info.num_classes == 3


def test_resampled_mode_gives_equal_full_batches_on_every_rank(birds):
    lengths = []
    for rank in range(2):
        loader, info = make_loader(birds, "train", batch_size=4, img_size=32, train=True, rank=rank, world_size=2,
                                   num_workers=2, resampled=True)
        batches = list(loader)
        assert len(batches) == len(loader) == math.ceil(45 / (2 * 4))
        assert all(len(b["keys"]) == 4 for b in batches)
        lengths.append(len(batches))
    assert lengths[0] == lengths[1] and info.samples_per_rank == [24, 24]


def test_class_balance_flattens_a_long_tail(birds):
    def label_counts(balance):
        loader, _ = make_loader(birds, "train", batch_size=15, img_size=32, train=True, resampled=True,
                                balance=balance, shuffle_buffer=50)
        counts = Counter()
        for epoch in range(12):
            loader.set_epoch(epoch)
            counts.update(int(l) for b in loader for l in b["labels"])
        return [counts[c] / sum(counts.values()) for c in range(3)]

    plain, balanced, sqrt = label_counts(None), label_counts("class"), label_counts("sqrt")
    assert plain[0] > 0.55 and plain[2] < 0.2  # 30/10/5
    assert all(abs(p - 1 / 3) < 0.1 for p in balanced)
    assert balanced[2] > sqrt[2] > plain[2]
    with pytest.raises(DataError, match="balance"):
        make_loader(birds, "train", batch_size=4, img_size=32, train=True, balance="inverse")


def test_corrupt_jpeg_and_truncated_tar_are_skipped_and_counted(tmp_path):
    dataset = make_dataset(tmp_path, "d", {"train": [0, 1] * 10}, CLASSES, shard_size=10)
    manifest = load_manifest(dataset)
    # a third shard with one good and one corrupt JPEG
    with wds.TarWriter(str(dataset / "d-train-000002.tar"), encoder=False, mtime=SHARD_MTIME) as writer:
        writer.write({"__key__": "d_train_good", "jpg": image_bytes(1), "cls": b"1", "json": b"{}"})
        writer.write({"__key__": "d_train_bad", "jpg": b"\xff\xd8\xff\xe0 not a jpeg", "cls": b"1", "json": b"{}"})
    manifest["shards"].append({"path": "d-train-000002.tar", "split": "train", "count": 2, "sha256": ""})
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    shard = dataset / "d-train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated mid-sample
    for num_workers in (0, 2):
        loader, _ = make_loader(dataset, "train", batch_size=4, img_size=32, train=False, num_workers=num_workers)
        keys = [k for b in loader for k in b["keys"]]
        assert "d_train_good" in keys and "d_train_bad" not in keys
        assert 10 < len(keys) < 21 and len(keys) == len(set(keys))
        assert loader.skipped >= 2 and any("truncated" in r.lower() or "tar" in r.lower() for r in loader.skip_reasons)
    strict, _ = make_loader(dataset, "train", batch_size=4, img_size=32, train=False, handler=wds.reraise_exception)
    with pytest.raises(Exception):
        list(strict)


def test_registry_maps_labels_to_the_append_only_union(tmp_path):
    gulls = make_dataset(tmp_path, "gulls", {"train": [0, 1, 2, 0]}, ["herring gull", "kittiwake", "tern"], 10)
    terns = make_dataset(tmp_path, "terns", {"train": [0, 1, 1]}, ["tern", "skua"], 10)
    registry = tmp_path / "registry.json"
    register_dataset(gulls, registry)
    before = json.loads(registry.read_text())["classes"]
    register_dataset(terns, registry)
    register_dataset(gulls, registry)  # re-registering moves nothing
    after = json.loads(registry.read_text())
    assert after["classes"][: len(before)] == before and after["classes"] == ["herring gull", "kittiwake", "tern", "skua"]
    assert set(after["datasets"]) == {"gulls", "terns"}
    loader, info = make_loader(registry, "train", batch_size=3, img_size=32, train=False)
    assert info.num_classes == 4 and info.class_counts == [2, 1, 2, 2] and info.num_samples == 7
    species = {s["__key__"]: json.loads(s["json"])["species"] for d in (gulls, terns) for s in stock_samples(d)}
    pairs = [(k, int(l)) for b in loader for k, l in zip(b["keys"], b["labels"])]
    assert len(pairs) == 7 and all(info.class_names[label] == species[key] for key, label in pairs)


def test_jpeg_reduced_size_decode_keeps_the_needed_side():
    big = image_bytes(0, 400)
    assert decode_image(big, min_side=90).size == (100, 100)  # 1/4 scale is the largest >= 90
    assert decode_image(big, min_side=None).size == (400, 400)
    png = io.BytesIO()
    Image.new("RGB", (400, 300)).save(png, format="PNG")
    assert decode_image(png.getvalue(), min_side=90).size == (400, 300)


def test_eval_loader_is_deterministic(birds):
    def images():
        loader, _ = make_loader(birds, "val", batch_size=6, img_size=32, train=False, num_workers=0)
        return torch.cat([b["images"] for b in loader])

    first, second = images(), images()
    assert first.shape == (6, 3, 32, 32) and torch.equal(first, second)
