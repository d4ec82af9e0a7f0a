"""Unlabelled images (``mgmoe shards build --unlabelled``) and pseudo-labels (``data.pseudo_min_score``)."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch

from mgmoe_ds.cli import main
from mgmoe_ds.config import ConfigError, config_from_dict
from mgmoe_ds.data import DataError, load_manifest, load_registry, make_loader, register_dataset, verify_dataset
from mgmoe_ds.data.registry import union_label_map
from mgmoe_ds.data.shards import Sample, write_dataset
from test_data_shards import image_bytes, make_imagefolder

SPLIT_ARGS = ["--split", "train=0.5,val=0.25,test=0.25", "--no-progress"]


def make_field_folder(root: Path) -> dict[str, bytes]:
    """Field photos: three at the top, two in a nested folder, and a text file; returns their bytes by path."""
    (root / "2024" / "june").mkdir(parents=True)
    photos = {f"{root.name}/a{i}.jpg": image_bytes(500 + i) for i in range(3)}
    photos.update({f"{root.name}/2024/june/b{i}.png": image_bytes(600 + i, fmt="PNG") for i in range(2)})
    for relpath, data in photos.items():
        (root.parent / relpath).write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    return photos


def build(tmp_path: Path, *extra: str, name: str = "birds") -> int:
    src = tmp_path / "src"
    if not src.exists():
        make_imagefolder(src)
    return main(["shards", "build", str(src), "--format", "imagefolder", "--name", name, "--out",
                 str(tmp_path / "out"), *SPLIT_ARGS, "--shard-size", "3", *extra])


def tar_members(dataset: Path, split: str) -> dict[str, dict[str, bytes]]:
    """Every member of a split's shards, read with tarfile: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in load_manifest(dataset)["shards"]:
        if shard["split"] == split:
            with tarfile.open(dataset / shard["path"]) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture()
def with_field(tmp_path, capsys) -> tuple[Path, dict[str, bytes], str]:
    """A build with ``--unlabelled``: the dataset folder, the field photos and what the build printed."""
    photos = make_field_folder(tmp_path / "field")
    assert build(tmp_path, "--unlabelled", str(tmp_path / "field")) == 0
    return tmp_path / "out" / "birds", photos, capsys.readouterr().out


def test_unlabelled_folder_becomes_a_split_without_cls(with_field):
    dataset, photos, printed = with_field
    assert "unlabelled 5" in printed
    manifest = load_manifest(dataset)
    assert manifest["counts"]["unlabelled"] == {"total": 5}
    assert {split: manifest["counts"][split]["total"] for split in ("train", "val", "test")} == \
        {"train": 6, "val": 3, "test": 3}  # the labelled source is built as without --unlabelled
    entries = [s for s in manifest["shards"] if s["split"] == "unlabelled"]
    assert sum(s["count"] for s in entries) == 5 and all("per_class" not in s for s in entries)
    assert {"path": "field/notes.txt", "reason": "not an image file extension"} in manifest["skipped"]
    samples = tar_members(dataset, "unlabelled")
    assert len(samples) == 5
    stored = {}
    for members in samples.values():
        assert "cls" not in members and set(members) in ({"jpg", "json"}, {"png", "json"})
        meta = json.loads(members["json"])
        assert meta["label"] is None and meta["species"] is None and meta["split"] == "unlabelled"
        stored[meta["path"]] = members.get("jpg", members.get("png"))
    assert stored == photos  # every image once, its original bytes
    assert all("cls" in members for members in tar_members(dataset, "train").values())


def test_verify_and_the_registry_accept_an_unlabelled_split(with_field, tmp_path):
    dataset, _, _ = with_field
    assert verify_dataset(dataset, progress=False) == []
    registry_path = tmp_path / "registry.json"
    register_dataset(dataset, registry_path)
    registry = load_registry(registry_path)
    assert registry["datasets"]["birds"]["counts"] == {"train": 6, "val": 3, "test": 3, "unlabelled": 5}
    assert union_label_map(registry, load_manifest(dataset)["classes"]) == [0, 1, 2]
    loader, _ = make_loader(registry_path, "unlabelled", batch_size=8, img_size=32, train=False)
    assert sum(len(batch["keys"]) for batch in loader) == 5


def test_verify_flags_an_unlabelled_sample_that_claims_a_label(tmp_path):
    sample = Sample("x_unlabelled_0000000", image_bytes(1, 24), "jpg", None, {"label": 2, "path": "a.jpg"})
    dataset = write_dataset({"unlabelled": [sample]}, ["crow"], tmp_path, "x", shard_size=4, skipped=[], options={},
                            source="test")
    problems = verify_dataset(dataset, progress=False)
    assert len(problems) == 1 and 'x_unlabelled_0000000.json: expected "label": null' in problems[0]


def test_the_unlabelled_split_is_read_only_when_asked_for(with_field):
    dataset, _, _ = with_field
    loader, info = make_loader(dataset, "unlabelled", batch_size=2, img_size=32, train=False)
    batches = list(loader)
    keys = [key for batch in batches for key in batch["keys"]]
    assert sorted(keys) == [f"birds_unlabelled_{i:07d}" for i in range(5)] and info.num_samples == 5
    assert all(batch["images"].shape[1:] == (3, 32, 32) for batch in batches)
    assert all(batch["labels"].tolist() == [-1] * len(batch["keys"]) for batch in batches)
    for split in ("train", "val", "test"):
        loader, _ = make_loader(dataset, split, batch_size=4, img_size=32, train=split == "train")
        labels = [label for batch in loader for label in batch["labels"].tolist()]
        assert labels and all(0 <= label < 3 for label in labels)
    with pytest.raises(DataError, match="no classes to balance"):
        make_loader(dataset, "unlabelled", batch_size=2, img_size=32, train=True, balance="class")


def test_a_folder_of_class_folders_is_refused_in_one_line(tmp_path, capsys):
    field = make_imagefolder(tmp_path / "field", classes=("heron", "egret", "ibis"), per_class=1)
    assert build(tmp_path, "--unlabelled", str(field)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert f"--unlabelled {field}: every image is inside a sub-folder ('egret', 'heron', ...)" in error[0]
    assert "these look like class folders: build them as a labelled source (`mgmoe shards build " in error[0]
    assert "--format imagefolder`) or pass a folder of images" in error[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written
    (field / "loose.jpg").write_bytes(image_bytes(9))  # one image outside the sub-folders: not class folders
    assert build(tmp_path, "--unlabelled", str(field)) == 0
    assert load_manifest(tmp_path / "out" / "birds")["counts"]["unlabelled"] == {"total": 4}


def write_csv_source(root: Path, labels: list[str]) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for i, label in enumerate(labels):
        (root / "img" / f"{i}.jpg").write_bytes(image_bytes(700 + i))
        rows.append(f"img/{i}.jpg,{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_a_partly_labelled_csv_is_refused_in_one_line(tmp_path, capsys):
    csv_path = write_csv_source(tmp_path / "csv", ["heron", "", "egret", "", "heron", "egret"])
    assert main(["shards", "build", str(csv_path), "--format", "csv", "--name", "h", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"mgmoe shards: error: {csv_path}: the label column is empty in 2 of 6 rows (lines 3, 5): split "
                     f"the file into a labelled CSV (the source, --format csv) and an unlabelled one with a path "
                     f"column and no labels (--unlabelled UNLABELLED.csv)"]
    assert not (tmp_path / "out").exists()
    # the same file as --unlabelled: labels in some rows are refused there too
    assert build(tmp_path, "--unlabelled", str(csv_path)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{csv_path}: the label column is filled in 4 of 6 rows (lines 2, 4, 6, 7)" in error[0]


def test_an_unlabelled_csv_builds_the_split(tmp_path):
    csv_path = write_csv_source(tmp_path / "csv", ["", "", ""])
    assert build(tmp_path, "--unlabelled", str(csv_path)) == 0
    dataset = tmp_path / "out" / "birds"
    assert load_manifest(dataset)["counts"]["unlabelled"] == {"total": 3}
    paths = {json.loads(m["json"])["path"] for m in tar_members(dataset, "unlabelled").values()}
    assert paths == {"img/0.jpg", "img/1.jpg", "img/2.jpg"}
    assert verify_dataset(dataset, progress=False) == []


def pseudo_dataset(out: Path) -> Path:
    """Train: three labelled samples (class 0) and three pseudo-labelled ones (stored class 0,
    pseudo-labels 1, 2, 1 scored 0.2, 0.5, 0.9); shards of two samples."""
    samples = []
    for i in range(3):
        samples.append(Sample(f"p_train_{i:07d}", image_bytes(i, 24), "jpg", 0, {"path": f"l{i}.jpg", "bbox": None}))
    for i, (label, score) in enumerate([(1, 0.2), (2, 0.5), (1, 0.9)], 3):
        pseudo = {"label": label, "score": score, "method": "test"}
        samples.append(Sample(f"p_train_{i:07d}", image_bytes(i, 24), "jpg", 0,
                              {"path": f"u{i}.jpg", "bbox": None, "pseudo": pseudo}))
    return write_dataset({"train": samples}, ["crow", "finch", "wren"], out, "p", shard_size=2, skipped=[],
                         options={}, source="test")


def loader_run(dataset: Path, **kwargs) -> tuple[dict[str, int], object]:
    loader, _ = make_loader(dataset, "train", batch_size=2, img_size=32, train=False, **kwargs)
    labels = {key: int(label) for batch in loader for key, label in zip(batch["keys"], batch["labels"])}
    return labels, loader


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pseudo_min_score_keeps_exactly_the_pseudo_labels_at_or_above_it(tmp_path, num_workers):
    dataset = pseudo_dataset(tmp_path)
    labels, loader = loader_run(dataset, pseudo_min_score=0.5, num_workers=num_workers)
    assert labels == {"p_train_0000000": 0, "p_train_0000001": 0, "p_train_0000002": 0,
                      "p_train_0000004": 2, "p_train_0000005": 1}  # 0.5 and 0.9 with their pseudo-labels
    assert (loader.pseudo_left_out, loader.skipped) == (1, 0)  # 0.2 left out, counted apart from bad samples
    labels, loader = loader_run(dataset, num_workers=num_workers)  # default 0.0: every pseudo-label
    assert labels["p_train_0000003"] == 1 and len(labels) == 6 and loader.pseudo_left_out == 0
    labels, loader = loader_run(dataset, pseudo_min_score=0.95, num_workers=num_workers)
    assert sorted(labels) == ["p_train_0000000", "p_train_0000001", "p_train_0000002"]
    assert loader.pseudo_left_out == 3  # with 2 workers, one's count comes after its last batch


def test_a_malformed_pseudo_record_is_a_bad_sample(tmp_path):
    sample = Sample("m_train_0000000", image_bytes(0, 24), "jpg", 0,
                    {"path": "a.jpg", "pseudo": {"label": 7, "score": 0.9, "method": "test"}})  # 7: no such class
    dataset = write_dataset({"train": [sample, Sample("m_train_0000001", image_bytes(1, 24), "jpg", 1, {})]},
                            ["crow", "finch"], tmp_path, "m", shard_size=4, skipped=[], options={}, source="test")
    labels, loader = loader_run(dataset)
    assert labels == {"m_train_0000001": 1}
    assert loader.skipped == 1 and "pseudo" in loader.skip_reasons[0] and loader.pseudo_left_out == 0
    with pytest.raises(DataError, match="pseudo_min_score = 1.5"):
        make_loader(dataset, "train", batch_size=2, img_size=32, train=False, pseudo_min_score=1.5)


@pytest.mark.parametrize("score", [-0.1, 1.5])
def test_pseudo_min_score_outside_0_1_is_a_one_line_config_error(score):
    assert config_from_dict({"data": {"pseudo_min_score": 0.7}}).data.pseudo_min_score == 0.7
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"pseudo_min_score": score}})
    assert "mgmoe.data.pseudo_min_score" in str(err.value) and "[0, 1]" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_each_batch_marks_exactly_the_samples_that_train_with_a_pseudo_label(tmp_path):
    dataset = pseudo_dataset(tmp_path)
    loader, _ = make_loader(dataset, "train", batch_size=2, img_size=32, train=False, pseudo_min_score=0.5)
    batches = list(loader)
    assert all(b["pseudo"].dtype == torch.bool and b["pseudo"].shape == b["labels"].shape for b in batches)
    flags = {key: bool(flag) for b in batches for key, flag in zip(b["keys"], b["pseudo"])}
    assert flags == {"p_train_0000000": False, "p_train_0000001": False, "p_train_0000002": False,
                     "p_train_0000004": True, "p_train_0000005": True}  # 3 (score 0.2) left out
    unlabelled, _ = make_loader(dataset, "train", batch_size=2, img_size=32, train=False, pseudo_min_score=0.95)
    assert not any(bool(b["pseudo"].any()) for b in unlabelled)  # every pseudo-label left out: none marked


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_pseudo_weight_outside_0_1_is_a_one_line_config_error(weight):
    assert config_from_dict({"data": {"pseudo_weight": 0.25}}).data.pseudo_weight == 0.25
    assert config_from_dict({}).data.pseudo_weight == 1.0
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"pseudo_weight": weight}})
    assert "mgmoe.data.pseudo_weight" in str(err.value) and "[0, 1]" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.slow
def test_a_job_trains_on_weighted_pseudo_labels_and_ends_routing_through_the_cluster_gate(tmp_path):
    """Both issue-19 settings through the real trainer (one process, DeepSpeed ZeRO-2): pseudo-labelled
    samples at ``data.pseudo_weight`` 0.5, and ``moe.routing = "cluster"`` in a run whose last stage is
    the routing stage, which then trains, evaluates and exports through the cluster gate."""
    from conftest import launch_training, succeeded, write_tiny_config
    from mgmoe_ds.export import export_model
    from mgmoe_ds.inference import load_trained

    classes = ["crow", "finch", "wren", "tit"]
    train = [Sample(f"j_train_{i:07d}", image_bytes(700 + i), "jpg", i % 4, {"path": f"l{i}.jpg"}) for i in range(16)]
    train += [Sample(f"j_train_{i:07d}", image_bytes(700 + i), "jpg", 0,
                     {"path": f"u{i}.jpg", "pseudo": {"label": i % 4, "score": 0.9, "method": "test"}})
              for i in range(16, 24)]
    val = [Sample(f"j_val_{i:07d}", image_bytes(800 + i), "jpg", i % 4, {"path": f"v{i}.jpg"}) for i in range(8)]
    dataset = write_dataset({"train": train, "val": val}, classes, tmp_path / "data", "j", shard_size=8, skipped=[],
                            options={}, source="test")
    stages = [{"name": "warmup", "steps": 2}, {"name": "routing", "steps": 2}]
    config = write_tiny_config(tmp_path / "ds.json", moe={"routing": "cluster"}, data={"pseudo_weight": 0.5},
                               curriculum={"stages": stages, "num_clusters": 2})
    run = tmp_path / "run"
    succeeded(launch_training(config, dataset, run))
    record = json.loads((run / "stages" / "1_routing.json").read_text())
    assert record["moe_routing"] == "cluster" and record["routing"]["kind"] == "cluster"
    assert record["routing"]["dropless"] and len(record["routing"]["cluster_experts"]) == 2
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [e["losses"]["task"] for e in events if e.get("event") == "train" and "losses" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    _, meta = load_trained(run)
    assert meta.final_stage == "routing" and meta.routing.clusters is not None
    _, exported = load_trained(export_model(run, tmp_path / "model.safetensors"))
    assert exported.routing.to_json()["kind"] == "cluster"  # the export's metadata and routing.* tensors
    assert torch.equal(exported.routing.clusters.cluster_experts, meta.routing.clusters.cluster_experts)
    assert torch.equal(exported.routing.clusters.centroids, meta.routing.clusters.centroids)
