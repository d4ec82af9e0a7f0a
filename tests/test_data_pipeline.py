"""The streaming pipeline: epochs over ranks and workers, resampling, balance, skips, registry labels."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from mgmoe_ds.data import DataError, make_loader, register_dataset
from mgmoe_ds.data.balance import balance_offsets, systematic_copies, systematic_total
from mgmoe_ds.data.shards import SHARD_MTIME, load_manifest
from mgmoe_ds.data.transforms import decode_image
from test_data_shards import image_bytes, make_dataset, stock_samples

CLASSES = ["kite", "hawk", "falcon"]
TAIL = [100, 30, 10]  # training samples per class of the long-tailed set
# Repeat factors worked out by hand: "class" gives each class 140 / 3 samples per epoch, "sqrt"
# gives class c 140 * sqrt(n_c) / (sqrt(100) + sqrt(30) + sqrt(10)) samples.
TAIL_FACTORS = {
    "class": [140 / 3 / 100, 140 / 3 / 30, 140 / 3 / 10],
    "sqrt": [140 * math.sqrt(n) / (10 + math.sqrt(30) + math.sqrt(10)) / n for n in TAIL],
}


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    """45 training samples (long-tailed: 30/10/5) in 7 shards, and 6 validation samples."""
    labels = [0] * 30 + [1] * 10 + [2] * 5
    labels = labels[::2] + labels[1::2]  # mix classes across shards
    return make_dataset(tmp_path_factory.mktemp("birds"), "birds", {"train": labels, "val": [0, 1, 2] * 2},
                        CLASSES, shard_size=7)


@pytest.fixture(scope="module")
def long_tail(tmp_path_factory):
    """140 training samples, 100/30/10 over three classes, mixed over 7 shards of 20."""
    labels = [c for c, n in enumerate(TAIL) for _ in range(n)]
    random.Random(0).shuffle(labels)
    return make_dataset(tmp_path_factory.mktemp("tail"), "tail", {"train": labels}, CLASSES, shard_size=20)


def hand_class_yield(loader, shard_counts, factors, epoch, rank, num_workers):
    """Samples of each class a balanced pass yields, from the manifest's class counts, the factors
    and each worker's offsets: sum over workers of floor(m_c * f_c + u_c).

    Args:
        loader: the loader, asked only which shards each worker reads in ``epoch``.
        shard_counts: shard file name -> {loader label: samples}.
        factors: repeat factor of each class.
        epoch, rank, num_workers: whose pass; the loaders here use ``epoch_seed=5``.
    """
    per_class = [0] * len(factors)
    workers = max(1, num_workers)
    for worker in range(workers):
        seen = Counter()
        for shard in loader.stream.worker_shards(worker, workers, epoch):
            seen.update(shard_counts[Path(shard.url).name])
        offsets = balance_offsets(5, epoch, rank, worker, len(factors))
        for c, f in enumerate(factors):
            per_class[c] += math.floor(seen[c] * f + offsets[c])
    return per_class


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


@pytest.mark.parametrize("num_workers, world_size", [(0, 1), (2, 2)])
@pytest.mark.parametrize("balance", ["class", "sqrt"])
def test_balanced_len_is_the_number_of_batches_yielded(long_tail, balance, num_workers, world_size):
    manifest = load_manifest(long_tail)
    shard_counts = {s["path"]: {int(k): n for k, n in s["per_class"].items()} for s in manifest["shards"]}
    factors = TAIL_FACTORS[balance]
    for epoch in (0, 1):
        yielded, expected = Counter(), [0, 0, 0]
        for rank in range(world_size):
            loader, info = make_loader(long_tail, "train", batch_size=16, img_size=16, train=True, rank=rank,
                                       world_size=world_size, num_workers=num_workers, epoch_seed=5, balance=balance)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(loader) == len(batches)
            yielded.update(int(label) for b in batches for label in b["labels"])
            by_hand = hand_class_yield(loader, shard_counts, factors, epoch, rank, num_workers)
            expected = [a + b for a, b in zip(expected, by_hand)]
        assert [yielded[c] for c in range(3)] == expected
        total = sum(expected)
        assert abs(total - 140) <= 3 * max(1, num_workers) * world_size and total != 312  # 312: the mean-factor guess
        assert yielded[2] / total > 2 * 10 / 140 and yielded[0] / total < 100 / 140
        target = 1 / 3 if balance == "class" else math.sqrt(10) / (10 + math.sqrt(30) + math.sqrt(10))
        assert abs(yielded[2] / total - target) < 0.03


def test_balanced_len_without_per_shard_counts_is_the_expected_count(long_tail, tmp_path):
    """A manifest from before per-shard class counts: loads, yields, and len is right within rounding."""
    old = tmp_path / "tail"
    shutil.copytree(long_tail, old)
    manifest = load_manifest(old)
    for shard in manifest["shards"]:
        del shard["per_class"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    loader, _ = make_loader(old, "train", batch_size=16, img_size=16, train=True, epoch_seed=5, balance="class")
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        samples = sum(len(b["keys"]) for b in loader)
        assert abs(samples - 140) <= 3  # floor(m_c * f_c + u_c) for three classes whose m_c * f_c add to 140
        assert abs(len(loader) - math.ceil(samples / 16)) <= 1
    register_dataset(old, tmp_path / "registry.json")
    loader, info = make_loader(tmp_path / "registry.json", "train", batch_size=16, img_size=16, train=False,
                               balance="sqrt")
    samples = sum(len(b["keys"]) for b in loader)
    assert info.num_samples == 140 and abs(samples - 140) <= 3 and abs(len(loader) - math.ceil(samples / 16)) <= 1


def test_balanced_registry_counts_shards_in_the_union_labels(tmp_path):
    """Per-shard counts go through each dataset's label map: tern is 2 in gulls and 0 in terns."""
    gulls = make_dataset(tmp_path, "gulls", {"train": [0] * 12 + [1] * 4 + [2] * 2},
                         ["herring gull", "kittiwake", "tern"], 10)
    terns = make_dataset(tmp_path, "terns", {"train": [0] * 6 + [1] * 2}, ["tern", "skua"], 10)
    registry = tmp_path / "registry.json"
    register_dataset(gulls, registry)
    register_dataset(terns, registry)
    union = ["herring gull", "kittiwake", "tern", "skua"]
    shard_counts = {}
    for dataset in (gulls, terns):
        manifest = load_manifest(dataset)
        for s in manifest["shards"]:
            shard_counts[s["path"]] = {union.index(manifest["classes"][int(k)]): n for k, n in s["per_class"].items()}
    factors = [26 / 4 / n for n in (12, 4, 8, 2)]  # each species 26 / 4 samples per epoch
    loader, info = make_loader(registry, "train", batch_size=3, img_size=16, train=True, epoch_seed=5, balance="class")
    assert info.class_counts == [12, 4, 8, 2]
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        labels = Counter(int(label) for b in batches for label in b["labels"])
        assert len(loader) == len(batches)
        assert [labels[c] for c in range(4)] == hand_class_yield(loader, shard_counts, factors, epoch, 0, 0)


def test_systematic_rounding_by_hand():
    # f = 2.5, u = 0.3: floor(k * 2.5 + 0.3) for k = 0..4 is floor of 0.3, 2.8, 5.3, 7.8, 10.3 =
    # 0, 2, 5, 7, 10, so the four samples get 2 - 0, 5 - 2, 7 - 5, 10 - 7 = 2, 3, 2, 3 copies.
    assert [systematic_copies(i, 2.5, 0.3) for i in range(4)] == [2, 3, 2, 3]
    assert systematic_total(4, 2.5, 0.3) == 10
    # f = 0.4, u = 0.7: floor of 0.7, 1.1, 1.5, 1.9, 2.3, 2.7 = 0, 1, 1, 1, 2, 2: copies 1, 0, 0, 1, 0.
    assert [systematic_copies(i, 0.4, 0.7) for i in range(5)] == [1, 0, 0, 1, 0]
    # Whatever f and u, m samples get floor(m * f + u) copies, within one of m * f.
    rng = random.Random(0)
    for _ in range(200):
        m, f, u = rng.randrange(1, 300), rng.uniform(0, 6), rng.random()
        copies = sum(systematic_copies(i, f, u) for i in range(m))
        assert copies == math.floor(m * f + u) and abs(copies - m * f) < 1
    # The offsets are in [0, 1), the same on every call, and new for each worker and epoch.
    offsets = balance_offsets(5, 0, 1, 0, 4)
    assert offsets.shape == (4,) and ((0 <= offsets) & (offsets < 1)).all()
    assert (offsets == balance_offsets(5, 0, 1, 0, 4)).all()
    assert (offsets != balance_offsets(5, 0, 1, 1, 4)).all() and (offsets != balance_offsets(5, 1, 1, 0, 4)).all()


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
