"""Shard building (imagefolder, cub, csv), the manifest, verify and bad-input errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mgmoe_ds.cli import main
from mgmoe_ds.data import DataError, build_shards, load_manifest, make_loader, read_listing, verify_dataset
from mgmoe_ds.data.shards import Sample, sha256_file, shard_sizes, write_dataset

SPLIT = {"train": 0.5, "val": 0.25, "test": 0.25}


def image_bytes(seed: int, size: int = 32, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_imagefolder(root: Path, classes=("crow", "finch", "wren"), per_class: int = 4) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.jpg").write_bytes(image_bytes(100 * c + i))
    return root


def make_dataset(out: Path, name: str, labels_by_split: dict[str, list[int]], classes: list[str], shard_size: int) -> Path:
    """A shard dataset written directly from synthetic samples (no source folder)."""
    samples = {
        split: [Sample(f"{name}_{split}_{i:07d}", image_bytes(i + 1000 * len(split), 24), "jpg", label,
                       {"species": classes[label], "dataset": name, "path": f"{split}/{i}.jpg", "split": split, "bbox": None})
                for i, label in enumerate(labels)]
        for split, labels in labels_by_split.items()
    }
    return write_dataset(samples, classes, out, name, shard_size=shard_size, skipped=[], options={}, source="test")


def stock_samples(dataset_dir: Path) -> list[dict]:
    """Every sample of every shard, read by stock webdataset."""
    manifest = load_manifest(dataset_dir)
    urls = [str(dataset_dir / s["path"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def loader_labels(dataset_dir: Path, split: str) -> dict[str, int]:
    loader, _ = make_loader(dataset_dir, split, batch_size=4, img_size=32, train=False)
    return {key: int(label) for batch in loader for key, label in zip(batch["keys"], batch["labels"])}


def test_imagefolder_round_trip_with_stratified_split(tmp_path):
    src = make_imagefolder(tmp_path / "src")
    listing = read_listing("imagefolder", src, SPLIT, seed=0)
    out = build_shards(listing, tmp_path / "out", "birds", source=str(src), shard_size=3, progress=False)
    manifest = load_manifest(out)
    assert manifest["classes"] == ["crow", "finch", "wren"]
    for split, share in SPLIT.items():  # stratified: every class gets its share
        assert manifest["counts"][split]["per_class"] == {c: round(4 * share) for c in manifest["classes"]}
    assert sum(s["count"] for s in manifest["shards"]) == 12
    assert all(s["count"] <= 3 for s in manifest["shards"])
    for sample in stock_samples(out):
        meta = json.loads(sample["json"])
        assert sample["jpg"] == (src / meta["path"]).read_bytes()  # original bytes, not re-encoded
        assert manifest["classes"][int(sample["cls"])] == meta["species"] == meta["path"].split("/")[0]
    seen = {}
    for split in SPLIT:
        seen.update(loader_labels(out, split))
    assert len(seen) == 12
    species = {s["__key__"]: json.loads(s["json"])["species"] for s in stock_samples(out)}
    assert all(manifest["classes"][label] == species[key] for key, label in seen.items())


def test_a_split_fills_the_fewest_shards_of_equal_size(tmp_path):
    assert shard_sizes(720, 100) == [90] * 8 and shard_sizes(7, 3) == [3, 2, 2] and shard_sizes(4, 10) == [4]
    src = make_imagefolder(tmp_path / "src", per_class=4)
    out = build_shards(read_listing("imagefolder", src, {"train": 1.0}, seed=0), tmp_path / "out", "b",
                       source=str(src), shard_size=5, progress=False)
    assert [s["count"] for s in load_manifest(out)["shards"]] == [4, 4, 4]


def test_imagefolder_split_folders_are_kept(tmp_path):
    make_imagefolder(tmp_path / "src" / "train", per_class=3)
    make_imagefolder(tmp_path / "src" / "test", per_class=1)
    listing = read_listing("imagefolder", tmp_path / "src", SPLIT, seed=0)
    out = build_shards(listing, tmp_path / "out", "b", source="src", progress=False)
    counts = load_manifest(out)["counts"]
    assert (counts["train"]["total"], counts["test"]["total"], "val" in counts) == (9, 3, False)


def make_cub(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    images, labels, split, boxes = [], [], [], []
    for image_id in range(1, 7):
        cls = 1 + image_id % 2
        rel = f"{classes[cls - 1]}/{image_id}.jpg"
        (root / "images" / classes[cls - 1]).mkdir(exist_ok=True)
        (root / "images" / rel).write_bytes(image_bytes(image_id, 40))
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {cls}")
        split.append(f"{image_id} {int(image_id <= 4)}")
        boxes.append(f"{image_id} {image_id}.0 2.0 20.0 30.0")
    (root / "classes.txt").write_text("\n".join(f"{i + 1} {c}" for i, c in enumerate(classes)) + "\n")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return root


def test_cub_round_trip_keeps_official_split_and_boxes(tmp_path):
    src = make_cub(tmp_path / "CUB_200_2011")
    out = build_shards(read_listing("cub", src, SPLIT, 0), tmp_path / "out", "cub", source=str(src), progress=False)
    manifest = load_manifest(out)
    assert manifest["classes"] == ["Black_footed_Albatross", "Laysan_Albatross"]
    assert {s: manifest["counts"][s]["total"] for s in manifest["counts"]} == {"train": 4, "test": 2}
    for sample in stock_samples(out):
        meta = json.loads(sample["json"])
        image_id = int(Path(meta["path"]).stem)
        assert meta["split"] == ("train" if image_id <= 4 else "test")
        assert meta["bbox"] == [float(image_id), 2.0, 20.0, 30.0]
        assert int(sample["cls"]) == (1 + image_id % 2) - 1
    assert len(loader_labels(out, "test")) == 2


def test_csv_round_trip_keeps_extension_split_and_boxes(tmp_path):
    root = tmp_path / "csvdata"
    (root / "img").mkdir(parents=True)
    rows = ["path,label,split,x,y,w,h"]
    for i in range(6):
        fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
        (root / "img" / f"{i}.{ext}").write_bytes(image_bytes(i, 20, fmt))
        rows.append(f"img/{i}.{ext},{'heron' if i % 2 else 'egret'},{'train' if i < 4 else 'val'},1,2,3,{4 + i}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    out = build_shards(read_listing("csv", root / "labels.csv", SPLIT, 0), tmp_path / "out", "herons",
                       source="labels.csv", progress=False)
    samples = stock_samples(out)
    assert len(samples) == 6
    for sample in samples:
        meta = json.loads(sample["json"])
        ext = meta["path"].rsplit(".", 1)[1]
        assert sample[ext] == (root / meta["path"]).read_bytes()
        i = int(Path(meta["path"]).stem)
        assert meta["bbox"] == [1.0, 2.0, 3.0, 4.0 + i] and meta["split"] == ("train" if i < 4 else "val")
    assert len(loader_labels(out, "train")) == 4 and len(loader_labels(out, "val")) == 2


def test_unreadable_files_are_skipped_and_listed(tmp_path):
    src = make_imagefolder(tmp_path / "src")
    (src / "crow" / "notes.txt").write_text("not an image")
    (src / "finch" / "broken.jpg").write_bytes(image_bytes(7)[:200])  # truncated JPEG
    out = build_shards(read_listing("imagefolder", src, SPLIT, 0), tmp_path / "out", "b", source="src", progress=False)
    manifest = load_manifest(out)
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"crow/notes.txt", "finch/broken.jpg"}
    assert "extension" in reasons["crow/notes.txt"] and reasons["finch/broken.jpg"]
    assert sum(s["count"] for s in manifest["shards"]) == 12


@pytest.mark.parametrize("case", ["cub_missing_labels", "csv_unknown_class", "empty_class", "csv_missing_column"])
def test_bad_input_is_one_line_error_before_any_shard(tmp_path, capsys, case):
    if case == "cub_missing_labels":
        src = make_cub(tmp_path / "cub")
        (src / "image_class_labels.txt").unlink()
        argv, expected = [str(src), "--format", "cub"], "image_class_labels.txt"
    elif case == "csv_unknown_class":
        (tmp_path / "a.jpg").write_bytes(image_bytes(1))
        (tmp_path / "classes.txt").write_text("heron\negret\n")
        (tmp_path / "d.csv").write_text("path,label\na.jpg,heron\na.jpg,pelican\n")
        argv, expected = [str(tmp_path / "d.csv"), "--format", "csv"], "'pelican'"
    elif case == "csv_missing_column":
        (tmp_path / "d.csv").write_text("file,label\na.jpg,heron\n")
        argv, expected = [str(tmp_path / "d.csv"), "--format", "csv"], "'path'"
    else:
        src = make_imagefolder(tmp_path / "src")
        (src / "robin").mkdir()
        argv, expected = [str(src), "--format", "imagefolder"], "'robin'"
    status = main(["shards", "build", *argv, "--name", "x", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and expected in err
    assert not list((tmp_path / "out").glob("**/*.tar"))


def test_rebuild_writes_identical_shards(tmp_path):
    src = make_imagefolder(tmp_path / "src")

    def build(out):
        listing = read_listing("imagefolder", src, SPLIT, seed=3)
        return load_manifest(build_shards(listing, out, "b", source="src", shard_size=2, seed=3, progress=False))

    first, second = build(tmp_path / "one"), build(tmp_path / "two")
    assert first["shards"] == second["shards"] and len(first["shards"]) > 3
    assert (tmp_path / "one/b/b-train-000000.tar").read_bytes() == (tmp_path / "two/b/b-train-000000.tar").read_bytes()


def test_max_side_resizes_large_images(tmp_path):
    src = tmp_path / "src" / "owl"
    src.mkdir(parents=True)
    (src / "big.jpg").write_bytes(image_bytes(1, 120))
    (src / "small.png").write_bytes(image_bytes(2, 30, "PNG"))
    listing = read_listing("imagefolder", tmp_path / "src", {"train": 1.0}, 0)
    out = build_shards(listing, tmp_path / "out", "owls", source="src", max_side=48, progress=False)
    sizes = {json.loads(s["json"])["path"]: Image.open(io.BytesIO(s.get("jpg") or s["png"])).size for s in stock_samples(out)}
    assert sizes == {"owl/big.jpg": (48, 48), "owl/small.png": (30, 30)}


def test_verify_catches_a_flipped_byte(tmp_path, capsys):
    src = make_imagefolder(tmp_path / "src")
    out = build_shards(read_listing("imagefolder", src, {"train": 1.0}, 0), tmp_path / "out", "b", source="src",
                       progress=False)
    assert verify_dataset(out, progress=False) == []
    shard = out / "b-train-000000.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    position = member.offset_data + member.size // 2
    data[position] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_dataset(out, progress=False)
    assert any("sha256" in p for p in problems)
    assert main(["shards", "verify", str(out), "--no-progress"]) == 1
    assert "sha256" in capsys.readouterr().err


def test_verify_catches_a_missing_sample(tmp_path):
    out = make_dataset(tmp_path, "d", {"train": [0, 1, 0, 1]}, ["a", "b"], shard_size=10)
    manifest = load_manifest(out)
    manifest["shards"][0]["count"] = 5
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert any("4 samples != manifest 5" in p for p in verify_dataset(out, progress=False))


def test_manifest_records_each_shards_class_counts_and_verify_checks_them(tmp_path):
    out = make_dataset(tmp_path, "d", {"train": [0, 1, 1, 2, 1, 0, 1]}, ["a", "b", "c"], shard_size=4)
    manifest = load_manifest(out)
    assert [s["per_class"] for s in manifest["shards"]] == [{"0": 1, "1": 2, "2": 1}, {"0": 1, "1": 2}]  # sparse
    assert verify_dataset(out, progress=False) == []
    manifest["shards"][1]["per_class"] = {"0": 2, "1": 2}
    (out / "manifest.json").write_text(json.dumps(manifest))
    (problem,) = verify_dataset(out, progress=False)
    assert problem == f"{out / 'd-train-000001.tar'}: label 0: 1 samples != manifest per_class 2"
    for shard in manifest["shards"]:  # a manifest written before per-class counts verifies as before
        del shard["per_class"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert verify_dataset(out, progress=False) == []


def test_verify_groups_samples_as_the_pipeline_does(tmp_path):
    """A key that comes back later in a shard is two samples to the pipeline, so verify counts two;
    a member written twice in one sample is an error for both."""
    out = make_dataset(tmp_path, "d", {"train": [0, 1]}, ["a", "b"], shard_size=10)
    shard = out / "d-train-000000.tar"
    manifest = load_manifest(out)
    fields = {"jpg": image_bytes(3), "cls": b"0", "json": b"{}"}
    with wds.TarWriter(str(shard), encoder=False) as writer:
        for key in ("k1", "k2", "k1"):
            writer.write({"__key__": key, **fields})
    manifest["shards"][0].update(count=2, sha256=sha256_file(shard))
    del manifest["shards"][0]["per_class"]  # an entry as written before per-class counts: only the count is checked
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert verify_dataset(out, progress=False) == [f"{shard}: 3 samples != manifest 2"]
    loader, _ = make_loader(out, "train", batch_size=8, img_size=32, train=False)
    assert [k for b in loader for k in b["keys"]] == ["k1", "k2", "k1"]
    with tarfile.open(shard, "w") as tar:  # k1.jpg twice in the same sample
        for name in ("k1.jpg", "k1.jpg", "k1.cls", "k1.json"):
            info = tarfile.TarInfo(name)
            info.size = len(fields[name.split(".")[1]])
            tar.addfile(info, io.BytesIO(fields[name.split(".")[1]]))
    manifest["shards"][0].update(count=1, sha256=sha256_file(shard))
    (out / "manifest.json").write_text(json.dumps(manifest))
    (problem,) = verify_dataset(out, progress=False)
    assert "duplicate file name" in problem and str(shard) in problem


def test_pipeline_reads_shards_from_stock_shardwriter(tmp_path):
    out = tmp_path / "stock"
    out.mkdir()
    classes = ["gull", "tern"]
    with wds.ShardWriter(str(out / "stock-train-%06d.tar"), maxcount=3, verbose=0) as writer:
        for i in range(5):
            writer.write({"__key__": f"s{i}", "jpg": image_bytes(i), "cls": i % 2,
                          "json": {"species": classes[i % 2], "dataset": "stock"}})
    shards = [{"path": p.name, "split": "train", "count": len(list(wds.WebDataset(str(p), shardshuffle=False))),
               "sha256": ""} for p in sorted(out.glob("*.tar"))]
    manifest = {"name": "stock", "classes": classes, "shards": shards,
                "counts": {"train": {"total": 5, "per_class": {"gull": 3, "tern": 2}}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert loader_labels(out, "train") == {f"s{i}": i % 2 for i in range(5)}


def test_unknown_source_and_split_are_clear_errors(tmp_path):
    out = make_dataset(tmp_path, "d", {"train": [0, 1]}, ["a", "b"], shard_size=10)
    with pytest.raises(DataError, match="no shards for split 'val'"):
        make_loader(out, "val", batch_size=2, img_size=32, train=False)
    with pytest.raises(DataError, match="manifest not found"):
        make_loader(tmp_path / "nothing", "train", batch_size=2, img_size=32, train=False)
