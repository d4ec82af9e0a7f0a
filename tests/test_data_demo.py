"""The synthetic demo birds: deterministic, long-tailed, not separable by global colour."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
from PIL import Image

from mgmoe_ds.data import build_demo, load_manifest, make_loader
from test_data_shards import stock_samples

SMALL = dict(num_classes=6, train_images=120, val_per_class=2, test_per_class=3, image_size=48, shard_size=40)


def test_demo_is_deterministic_and_long_tailed(tmp_path):
    first = load_manifest(build_demo(tmp_path / "one", **SMALL))
    second = load_manifest(build_demo(tmp_path / "two", **SMALL))
    assert first["shards"] == second["shards"]
    assert load_manifest(build_demo(tmp_path / "three", **dict(SMALL, seed=1)))["shards"] != first["shards"]
    train = list(first["counts"]["train"]["per_class"].values())
    assert train == sorted(train, reverse=True) and train[0] >= 5 * train[-1]
    assert first["counts"]["val"]["total"] == 12 and first["counts"]["test"]["total"] == 18
    assert len(set(first["classes"])) == 6
    for split, table in first["counts"].items():  # per-shard class counts add up to the split's
        per_class = Counter()
        for shard in (s for s in first["shards"] if s["split"] == split):
            assert sum(shard["per_class"].values()) == shard["count"]
            per_class.update({first["classes"][int(k)]: n for k, n in shard["per_class"].items()})
        assert dict(per_class) == table["per_class"]
    # Shards of a split get equal sizes (so that data workers get equal shares), not 50 + 50 + rest.
    uneven = load_manifest(build_demo(tmp_path / "four", **dict(SMALL, shard_size=50)))
    train_shards = [s["count"] for s in uneven["shards"] if s["split"] == "train"]
    assert len(train_shards) == 3 and max(train_shards) - min(train_shards) <= 1


def test_demo_images_and_boxes(tmp_path):
    dataset = build_demo(tmp_path, **SMALL)
    for sample in stock_samples(dataset)[:20]:
        image = Image.open(io.BytesIO(sample["jpg"]))
        box = json.loads(sample["json"])["bbox"]
        assert image.size == (48, 48) and box[2] > 10 and box[3] > 10
        assert 0 <= box[0] and box[0] + box[2] <= 48 and box[1] + box[3] <= 48
    loader, info = make_loader(dataset, "train", batch_size=16, img_size=32, train=True)
    assert sum(len(b["keys"]) for b in loader) == info.num_samples


def test_demo_classes_are_not_separable_by_global_colour(tmp_path):
    dataset = build_demo(tmp_path, **dict(SMALL, train_images=300, imbalance=1.0))
    features, labels = [], []
    for sample in stock_samples(dataset):
        if json.loads(sample["json"])["split"] == "train":
            features.append(np.asarray(Image.open(io.BytesIO(sample["jpg"])), dtype=np.float64).mean(axis=(0, 1)))
            labels.append(int(sample["cls"]))
    features, labels = np.stack(features), np.array(labels)  # (N, 3), (N,)
    half = len(labels) // 2
    centroids = np.stack([features[:half][labels[:half] == c].mean(0) for c in range(6)])  # (C, 3)
    predicted = np.argmin(((features[half:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == labels[half:]).mean() < 0.35  # chance is 1/6


def test_demo_above_72_species_adds_crests_and_keeps_smaller_sets_unchanged():
    from mgmoe_ds.data.demo import species_name, species_table

    small = species_table(72, seed=0)
    assert len(set(small)) == 72 and not any(crest for *_, crest in small)
    large = species_table(100, seed=0)
    assert len(set(large)) == 100 and any(crest for *_, crest in large)
    names = [species_name(*attributes) for attributes in large]
    assert len(set(names)) == 100 and any(name.endswith("_crested") for name in names)
    crested = next(a for a in large if a[-1])
    from mgmoe_ds.data.demo import render_image
    with_crest, _ = render_image(0, "train", 0, 0, crested, 64)
    without, _ = render_image(0, "train", 0, 0, (*crested[:-1], False), 64)
    assert np.abs(np.asarray(with_crest, dtype=int) - np.asarray(without, dtype=int)).max() > 0
