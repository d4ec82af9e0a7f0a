"""``mgmoe pseudo-label``: the pair network on features with a known truth, and the command end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from mgmoe_ds.cli import main
from mgmoe_ds.data import load_manifest, make_loader, verify_dataset
from mgmoe_ds.data.shards import Sample, write_dataset
from mgmoe_ds.data.tar_reader import tar_samples
from mgmoe_ds.pseudo_label import (class_exemplars, class_match_scores, precision_coverage, pseudo_labels,
                                   sample_pairs, train_pair_network)

# ---------------------------------------------------------------------------------------------
# The pair network on synthetic features whose truth is known

NUM_CLASSES, DIM = 4, 16


def gaussian_clusters(seed: int = 0) -> dict[str, torch.Tensor]:
    """Four unit-variance clusters in 16-D with means 5 * e_k (7.1 apart): 20 labelled images per
    class; 180 unlabelled ones drawn like them and 20 midway between class k and k + 1 (truth k,
    as good as a coin toss for any labeller)."""
    generator = torch.Generator().manual_seed(seed)
    means = 5.0 * torch.eye(NUM_CLASSES, DIM)  # (4, 16)
    labelled_truth = torch.arange(NUM_CLASSES).repeat_interleave(20)  # (80,)
    clean_truth = torch.arange(NUM_CLASSES).repeat(45)  # (180,)
    between_truth = torch.arange(NUM_CLASSES).repeat(5)  # (20,)
    between = (means[between_truth] + means[(between_truth + 1) % NUM_CLASSES]) / 2  # (20, 16)
    return {
        "labelled": means[labelled_truth] + torch.randn(80, DIM, generator=generator),
        "labels": labelled_truth,
        "unlabelled": torch.cat([means[clean_truth] + torch.randn(180, DIM, generator=generator),
                                 between + 0.3 * torch.randn(20, DIM, generator=generator)]),
        "truth": torch.cat([clean_truth, between_truth]),
        "means": means,
    }


def nearest_class_mean(labelled: torch.Tensor, labels: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The plain baseline: each point's class is the labelled class mean it is nearest to."""
    centres = torch.stack([labelled[labels == c].mean(0) for c in range(NUM_CLASSES)])  # (4, 16)
    return torch.cdist(points, centres).argmin(1)


def test_the_synthetic_set_is_separable_where_it_should_be():
    data = gaussian_clusters()
    guess = nearest_class_mean(data["labelled"], data["labels"], data["unlabelled"])
    assert (guess[:180] == data["truth"][:180]).float().mean() >= 0.99  # the clean images: any sane labeller
    assert (guess[180:] == data["truth"][180:]).float().mean() <= 0.8  # the midway ones: nobody's sure


def test_pairs_are_balanced_and_what_they_claim():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 30)
    first, second, same = sample_pairs(labels, 1000, torch.Generator().manual_seed(1))
    assert same.sum() == 500
    assert torch.equal(labels[first] == labels[second], same.bool())  # same-species pairs are, others are not
    assert (first[:500] != second[:500]).all()  # a same-species pair is two images where the species has two
    # the negatives' partner class is spread over the other classes, small ones included
    partner = labels[second[500:]]
    assert set(partner.tolist()) == {0, 1, 2} and (partner == 1).sum() > 100
    lonely = torch.tensor([0, 1, 1, 2, 2, 2])  # class 0 has one image: its positive pairs are it with itself
    first, second, same = sample_pairs(lonely, 600, torch.Generator().manual_seed(2))
    assert torch.equal(lonely[first] == lonely[second], same.bool())
    assert ((first[:300] == second[:300]) == (first[:300] == 0)).all()
    assert (first[:300] == 0).any()
    with pytest.raises(ValueError, match="two classes"):
        sample_pairs(torch.zeros(5, dtype=torch.long), 10, torch.Generator())


def test_exemplars_are_the_images_nearest_the_class_mean():
    angles = torch.tensor([0.0, 5.0, -5.0, 90.0, 180.0]) * math.pi / 180  # class 0: four; class 1: the last
    embeddings = torch.stack([angles.cos(), angles.sin()], 1)  # (5, 2) unit vectors
    labels = torch.tensor([0, 0, 0, 0, 1])
    indices, classes = class_exemplars(embeddings, labels, 3, per_class=3)
    assert sorted(indices[classes == 0].tolist()) == [0, 1, 2]  # not the one at 90 degrees
    assert indices[classes == 1].tolist() == [4] and not (classes == 2).any()  # fewer than m: all; none: none
    indices, _ = class_exemplars(embeddings, labels, 2, per_class=10)
    assert sorted(indices.tolist()) == [0, 1, 2, 3, 4]


def test_pseudo_labels_find_the_clusters_and_their_scores_rank_them():
    data = gaussian_clusters()
    network = train_pair_network(data["labelled"], data["labels"], steps=300, batch_pairs=128, lr=3e-3, seed=0)
    pred, scores = pseudo_labels(network, data["labelled"], data["labels"], data["unlabelled"],
                                 exemplars_per_class=8, num_classes=NUM_CLASSES + 1)  # class 4: no labelled images
    assert pred.shape == scores.shape == (200,) and pred.dtype == torch.long
    assert (pred < NUM_CLASSES).all() and ((0 <= scores) & (scores <= 1)).all()
    per_class = class_match_scores(network, data["labelled"], data["labels"], data["unlabelled"],
                                   exemplars_per_class=8, num_classes=NUM_CLASSES + 1)  # (200, 5)
    assert per_class[:, NUM_CLASSES].isnan().all() and torch.equal(per_class[:, :NUM_CLASSES].argmax(1), pred)
    rows = precision_coverage(pred, scores, data["truth"], [0.0, 0.5, 0.8])
    precision = [row.precision for row in rows]
    coverage = [row.coverage for row in rows]
    assert rows[0].coverage == 1.0 and precision[0] > 0.9
    assert (pred[:180] == data["truth"][:180]).float().mean() >= 0.97  # near the nearest class mean's 1.0 there
    assert precision == sorted(precision) and precision[2] >= 0.98  # surer labels are truer
    assert coverage == sorted(coverage, reverse=True) and coverage[2] <= 0.9 * coverage[0]
    kept = scores >= 0.8  # (200,)
    assert kept[180:].float().mean() < 0.5 * kept[:180].float().mean()  # the midway images go first
    assert scores[180:].mean() < scores[:180].mean() - 0.3  # they score lower
    # the same seed gives the same labeller
    again = train_pair_network(data["labelled"], data["labels"], steps=300, batch_pairs=128, lr=3e-3, seed=0)
    assert torch.equal(pseudo_labels(again, data["labelled"], data["labels"], data["unlabelled"],
                                     exemplars_per_class=8, num_classes=NUM_CLASSES + 1)[1], scores)


def test_with_the_labels_shuffled_the_pseudo_labels_are_near_chance():
    data = gaussian_clusters()
    shuffled = data["labels"][torch.randperm(80, generator=torch.Generator().manual_seed(3))]
    assert (shuffled == data["labels"]).float().mean() < 0.5
    network = train_pair_network(data["labelled"], shuffled, steps=300, batch_pairs=128, lr=3e-3, seed=0)
    pred, scores = pseudo_labels(network, data["labelled"], shuffled, data["unlabelled"], exemplars_per_class=8)
    assert precision_coverage(pred, scores, data["truth"], [0.0])[0].precision < 0.5


def test_precision_coverage_on_a_hand_made_case():
    pred = torch.tensor([0, 1, 1, 2])
    scores = torch.tensor([0.9, 0.6, 0.3, 0.8])
    truth = torch.tensor([0, 1, 0, 0])  # right, right, wrong, wrong
    rows = precision_coverage(pred, scores, truth, [0.0, 0.5, 0.85, 0.95])
    assert [(row.coverage, row.precision, row.kept) for row in rows] == [
        (1.0, 0.5, 4), (0.75, pytest.approx(2 / 3), 3), (0.25, 1.0, 1), (0.0, None, 0)]
    assert rows[1].to_json()["threshold"] == 0.5


# ---------------------------------------------------------------------------------------------
# The command on a tiny dataset with an unlabelled split


def split_samples(dataset: Path, split: str) -> list[dict]:
    shards = [{"url": str(dataset / s["path"])} for s in load_manifest(dataset)["shards"] if s["split"] == split]
    return list(tar_samples(shards, handler=lambda exn: False))


@pytest.fixture(scope="module")
def with_unlabelled(tiny_dataset, tmp_path_factory) -> tuple[Path, dict[str, int], dict[str, bytes]]:
    """The tiny demo birds' train and val splits, and its test images as the unlabelled split.

    Returns the dataset folder and, by unlabelled key, each image's true class and its bytes.
    """
    def labelled(split: str) -> list[Sample]:
        return [Sample(s["__key__"], s["jpg"], "jpg", int(s["cls"]), json.loads(s["json"]))
                for s in split_samples(tiny_dataset, split)]

    unlabelled, truth, images = [], {}, {}
    for sample in split_samples(tiny_dataset, "test"):
        key = sample["__key__"].replace("_test_", "_field_")
        meta = dict(json.loads(sample["json"]), species=None, label=None, split="unlabelled")
        unlabelled.append(Sample(key, sample["jpg"], "jpg", None, meta))
        truth[key], images[key] = int(sample["cls"]), sample["jpg"]
    classes = load_manifest(tiny_dataset)["classes"]
    folder = write_dataset({"train": labelled("train"), "val": labelled("val"), "unlabelled": unlabelled}, classes,
                           tmp_path_factory.mktemp("pseudo"), "birds_u", shard_size=24, skipped=[], options={},
                           source="tests")
    assert verify_dataset(folder, progress=False) == []
    return folder, truth, images


@pytest.fixture(scope="module")
def untrained_export(tiny_dataset, tmp_path_factory) -> Path:
    """A tiny MG-MoE with random weights and the demo birds' classes, exported: its features are
    not good, but they are a function of the image, which is all the command's bookkeeping needs."""
    from mgmoe_ds.export import save_export
    from test_inference import tiny_model_and_meta

    model, meta = tiny_model_and_meta()
    meta = dataclasses.replace(meta, class_names=list(load_manifest(tiny_dataset)["classes"]))
    return save_export(model, meta, tmp_path_factory.mktemp("export") / "tiny.safetensors")


def pseudo_label(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["pseudo-label", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "60",
                 "--batch-pairs", "64", "--no-progress", "--device", "cpu", *extra])


def pseudo_records(dataset: Path) -> dict[str, dict]:
    """Pseudo-labelled training samples by key: their json and the stored fields."""
    return {s["__key__"]: dict(s, meta=json.loads(s["json"])) for s in split_samples(dataset, "train")
            if b'"pseudo"' in s["json"]}


def test_the_command_writes_a_dataset_that_training_reads(with_unlabelled, untrained_export, tmp_path, capsys):
    data, truth, images = with_unlabelled
    before = load_manifest(data)
    out = tmp_path / "birds_pl"
    assert pseudo_label(untrained_export, data, out) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 16 of 16 unlabelled images pseudo-labelled at score >= 0" in printed
    assert all(f"  {species}: " in printed for species in before["classes"])
    assert "val (labels known): score >= 0: precision" in printed
    assert verify_dataset(out, progress=False) == []

    # every input shard is there, byte for byte, and 16 pseudo-labelled training images besides
    manifest = load_manifest(out)
    assert manifest["name"] == "birds_pl" and manifest["classes"] == before["classes"]
    for shard in before["shards"]:
        assert (out / shard["path"]).read_bytes() == (data / shard["path"]).read_bytes()
    records = pseudo_records(out)
    assert len(records) == 16
    assert manifest["counts"]["train"]["total"] == before["counts"]["train"]["total"] + 16
    assert manifest["counts"]["unlabelled"] == before["counts"]["unlabelled"] == {"total": 16}
    assert manifest["counts"]["val"] == before["counts"]["val"]
    assert manifest["pseudo_label"]["pseudo_labelled"] == 16 and manifest["pseudo_label"]["threshold"] == 0.0
    per_class_added = {species: manifest["counts"]["train"]["per_class"][species]
                       - before["counts"]["train"]["per_class"][species] for species in before["classes"]}
    scores = {}
    for key, sample in records.items():
        record = sample["meta"]["pseudo"]
        assert set(record) == {"label", "score", "method"} and record["method"] == "pair-network"
        assert int(sample["cls"]) == record["label"] and 0.0 <= record["score"] <= 1.0
        assert sample["meta"]["species"] == before["classes"][record["label"]]
        original = sample["meta"]["unlabelled_key"]
        assert sample["jpg"] == images[original]  # the original bytes, not re-encoded
        scores[key] = record["score"]
        per_class_added[before["classes"][record["label"]]] -= 1
    assert set(per_class_added.values()) == {0}  # per-class counts are those written
    assert sorted(r["meta"]["unlabelled_key"] for r in records.values()) == sorted(truth)

    # the statistics beside the manifest agree with the shards
    stats = json.loads((out / "pseudo_label.json").read_text())
    assert sum(stats["score_histogram"]["counts"]) == 16 and stats["pseudo_labelled"] == 16
    assert sum(row["written"] for row in stats["per_class"].values()) == 16
    assert stats["val"][0]["threshold"] == 0.0 and stats["val"][0]["coverage"] == 1.0
    assert (out / "pseudo_label_scores.png").stat().st_size > 1000

    # data.pseudo_min_score between the written scores leaves out exactly those below it
    distinct = sorted(set(scores.values()))
    assert len(distinct) >= 4
    cut = (distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2
    below = {key for key, score in scores.items() if score < cut}
    loader, _ = make_loader(out, "train", batch_size=16, img_size=32, train=False, pseudo_min_score=cut)
    seen = {key for batch in loader for key in batch["keys"]}
    assert loader.pseudo_left_out == len(below) > 0
    assert seen == {s["__key__"] for s in split_samples(data, "train")} | (set(scores) - below)

    # --threshold writes only those at or above it (the same seed: the same scores)
    out_cut = tmp_path / "birds_cut"
    assert pseudo_label(untrained_export, data, out_cut, "--threshold", str(cut)) == 0
    kept = pseudo_records(out_cut)
    assert sorted(r["meta"]["unlabelled_key"] for r in kept.values()) == \
        sorted(records[key]["meta"]["unlabelled_key"] for key in set(scores) - below)
    assert all(r["meta"]["pseudo"]["score"] >= cut for r in kept.values())
    assert load_manifest(out_cut)["counts"]["train"]["total"] == before["counts"]["train"]["total"] + len(kept)
    assert verify_dataset(out_cut, progress=False) == []


@pytest.mark.slow
def test_the_command_on_a_trained_run(with_unlabelled, trained_run, tmp_path, capsys):
    data, truth, _ = with_unlabelled
    out = tmp_path / "birds_run"
    assert pseudo_label(trained_run, data, out, "--threshold", "0.5") == 0
    assert verify_dataset(out, progress=False) == []
    stats = json.loads((out / "pseudo_label.json").read_text())
    records = pseudo_records(out)
    assert len(records) == stats["pseudo_labelled"] == sum(row["written"] for row in stats["per_class"].values())
    assert all(r["meta"]["pseudo"]["score"] >= 0.5 for r in records.values())
    assert sum(stats["score_histogram"]["counts"]) == len(truth)


# ---------------------------------------------------------------------------------------------
# Bad input: one line each


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("threshold", ["-0.1", "1.5"])
def test_a_threshold_outside_0_1_is_one_line(with_unlabelled, tmp_path, capsys, threshold):
    data, _, _ = with_unlabelled
    assert pseudo_label(tmp_path / "no_model", data, tmp_path / "out", "--threshold", threshold) == 2
    assert one_line_error(capsys) == f"mgmoe pseudo-label: error: --threshold = {float(threshold)}: expected a " \
                                     f"score in [0, 1]"
    assert not (tmp_path / "out").exists()


def test_a_dataset_without_an_unlabelled_split_is_one_line(tiny_dataset, tmp_path, capsys):
    assert pseudo_label(tmp_path / "no_model", tiny_dataset, tmp_path / "out") == 2
    error = one_line_error(capsys)
    assert f"{tiny_dataset}: no 'unlabelled' split to pseudo-label" in error
    assert "build it with `mgmoe shards build ... --unlabelled DIR`" in error


def test_an_existing_out_folder_is_refused_unless_overwrite(with_unlabelled, untrained_export, tmp_path, capsys):
    data, _, _ = with_unlabelled
    out = tmp_path / "birds_pl"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert pseudo_label(untrained_export, data, out) == 2
    assert f"--out {out}: already exists; pass --overwrite to replace it" in one_line_error(capsys)
    assert pseudo_label(untrained_export, data, out, "--overwrite") == 2  # not a dataset: left alone
    assert "is not a dataset folder" in one_line_error(capsys) and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    out.rmdir()
    assert pseudo_label(untrained_export, data, out) == 0
    assert pseudo_label(untrained_export, data, out, "--overwrite", "--threshold", "1.0") == 0  # a dataset: replaced
    assert load_manifest(out)["pseudo_label"]["threshold"] == 1.0 and verify_dataset(out, progress=False) == []
    assert not list(tmp_path.glob(".*partial"))
    # the output is refused as an input: its unlabelled images would be added twice
    capsys.readouterr()
    assert pseudo_label(untrained_export, out, tmp_path / "again") == 2
    assert "already pseudo-labelled" in one_line_error(capsys)


def test_a_model_of_other_classes_is_one_line(with_unlabelled, tmp_path, capsys):
    from mgmoe_ds.export import save_export
    from test_inference import tiny_model_and_meta

    data, _, _ = with_unlabelled
    model, meta = tiny_model_and_meta()  # wren, robin, finch, tit: four classes, not the birds'
    export = save_export(model, meta, tmp_path / "other.safetensors")
    assert pseudo_label(export, data, tmp_path / "out") == 2
    classes = load_manifest(data)["classes"]
    assert one_line_error(capsys) == (f"mgmoe pseudo-label: error: {export}: class 0 is 'wren' but in {data} it is "
                                      f"{classes[0]!r}: the model must be trained on that dataset's classes")
    assert not (tmp_path / "out").exists()
