"""Using a trained MG-MoE in one process: load, eval report, ablation, export (any P) and predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_MGMOE, write_tiny_config

TRAIN = [sys.executable, str(ROOT / "jobs" / "train.py")]
SHORT_STAGES = {"stages": [{"name": "warmup", "steps": 3}, {"name": "routing", "steps": 3},
                           {"name": "residual", "steps": 3}], "num_clusters": 3}


def train(config: Path, dataset: Path, run: Path, launcher: list[str] | None = None) -> Path:
    command = (launcher + [str(ROOT / "jobs" / "train.py")] if launcher else TRAIN)
    command += ["--deepspeed", str(config), "--data", str(dataset), "--output", str(run)]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                            text=True, timeout=420)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return run


def mgmoe(*args: str) -> subprocess.CompletedProcess:
    """The console script in a fresh process (no launcher, no RANK variables)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return subprocess.run([sys.executable, "-m", "mgmoe_ds.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset) -> Path:
    """One tiny single-process run through warmup, routing and residual (cluster-level routing)."""
    tmp = tmp_path_factory.mktemp("inference_run")
    return train(write_tiny_config(tmp / "ds.json", curriculum=SHORT_STAGES), tiny_dataset, tmp / "run")


@pytest.fixture(scope="module")
def eval_report(trained_run, tiny_dataset, tmp_path_factory) -> Path:
    from mgmoe_ds.cli import main

    out = tmp_path_factory.mktemp("eval")
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(tiny_dataset), "--out", str(out),
                 "--no-progress"]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Without training: the loader's contracts on synthetic files


def tiny_model_and_meta(seed: int = 0):
    from mgmoe_ds.config import config_from_dict
    from mgmoe_ds.inference import InferenceMeta, RoutingPolicy, build_model, inference_config, preprocessing_for

    config = inference_config(config_from_dict({"model": TINY_MGMOE["model"], "moe": TINY_MGMOE["moe"]}))
    torch.manual_seed(seed)
    model = build_model(config, 4)
    routing = RoutingPolicy(top_k=2, centroids=torch.randn(3, model.backbone.info.pooled_dim),
                            cluster_experts=torch.tensor([[0, 1], [2, 3], [1, 3]]))
    meta = InferenceMeta(config=config, class_names=["wren", "robin", "finch", "tit"],
                         preprocessing=preprocessing_for(model), routing=routing, source="<test>")
    return model, meta


def test_export_round_trip_keeps_weights_metadata_and_cluster_routing(tmp_path):
    from mgmoe_ds.export import save_export
    from mgmoe_ds.inference import load_trained, routed_forward

    model, meta = tiny_model_and_meta()
    path = save_export(model, meta, tmp_path / "model.safetensors")
    loaded, loaded_meta = load_trained(path)
    assert loaded_meta.class_names == meta.class_names
    assert loaded_meta.preprocessing == meta.preprocessing
    # the transform the training loaders use (the backbone's own normalisation), at the trained size
    assert loaded_meta.preprocessing.transform_options() == model.backbone.preprocessing()
    assert loaded_meta.preprocessing.img_size == 32
    assert loaded_meta.routing.kind == "cluster"
    assert torch.equal(loaded_meta.routing.cluster_experts, meta.routing.cluster_experts)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randn(5, 3, 32, 32)
    a, b = routed_forward(model, meta, images), routed_forward(loaded, loaded_meta, images)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.route.expert_indices, b.route.expert_indices)
    # cluster routing: each image's experts are its cluster's pair
    from mgmoe_ds.curriculum import assign_clusters

    clusters = assign_clusters(b.pooled, loaded_meta.routing.centroids)
    for row, cluster in enumerate(clusters.tolist()):
        assert set(b.route.expert_indices[row].tolist()) <= set(meta.routing.cluster_experts[cluster].tolist())


class Arbitrary:
    """Not a tensor: unpickling it would run arbitrary code."""


def test_checkpoint_files_holding_pickled_objects_are_refused(tmp_path):
    from mgmoe_ds.inference import InferenceError, load_tensors, load_trained

    evil = tmp_path / "progress.pt"
    torch.save({"stage_index": 0, "payload": Arbitrary()}, evil)
    with pytest.raises(InferenceError, match="refused to load"):
        load_tensors(evil)

    run = tmp_path / "run"
    folder = run / "checkpoints" / "stage0-warmup-end"
    folder.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"mgmoe": {"model": TINY_MGMOE["model"]}, "num_classes": 4}))
    (run / "checkpoints" / "last_good.json").write_text(json.dumps({"tag": "stage0-warmup-end"}))
    torch.save({"module": {"backbone.x": torch.zeros(1)}, "extra": Arbitrary()},
               folder / "mp_rank_00_model_states.pt")
    with pytest.raises(InferenceError, match="refused to load"):
        load_trained(run)


def test_foreign_safetensors_and_missing_paths_fail_in_one_line(tmp_path):
    from safetensors.torch import save_file

    from mgmoe_ds.inference import InferenceError, load_trained

    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(InferenceError, match="expected 'mgmoe-ds/1'"):
        load_trained(foreign)
    with pytest.raises(InferenceError, match="no such run folder"):
        load_trained(tmp_path / "nothing")


def test_long_tail_buckets_and_confused_pairs():
    from mgmoe_ds.report import confused_pairs, long_tail_buckets

    buckets, thresholds = long_tail_buckets([100, 50, 10, 2, 60, 5], head_min=50, tail_max=5)
    assert buckets == ["head", "head", "medium", "tail", "head", "tail"]
    assert thresholds == {"head_min": 50.0, "tail_max": 5.0}
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([1, 1, 0, 1, 0, 2]), 3).float()
    pairs = confused_pairs(logits, labels, ["a", "b", "c"])
    assert pairs[0] == {"true": "a", "predicted": "b", "count": 2, "rate": 2 / 3}
    assert pairs[1]["true"] == "b" and pairs[1]["predicted"] == "a" and len(pairs) == 2


# ---------------------------------------------------------------------------------------------
# On a trained tiny run


@pytest.mark.slow
def test_eval_report_has_every_section_and_figure(eval_report):
    report = json.loads((eval_report / "report.json").read_text())
    acc, eff, routing = report["accuracy"], report["efficiency"], report["routing"]
    assert report["images"] == 16 and report["final_stage"] == "residual"
    assert report["routing_policy"]["kind"] == "cluster"
    assert 0 <= acc["top1"] <= acc["top5"] <= 1
    assert len(acc["per_class"]) == 4 and {"species", "train_images", "bucket", "top1"} <= set(acc["per_class"][0])
    assert set(acc["long_tail"]["buckets"]) == {"head", "medium", "tail"}
    assert {"head_min", "tail_max"} <= set(acc["long_tail"]["thresholds"])
    assert isinstance(acc["confused_pairs"], list)
    assert eff["flops_per_image"]["dense"] > eff["flops_per_image"]["top_k"] > eff["flops_per_image"]["backbone"] > 0
    assert eff["parameters"]["total"] > eff["parameters"]["active_per_image"] > 0 and eff["images_per_s"] > 0
    assert len(routing["utilisation"]) == 4 and abs(routing["experts_per_image"] - 2) < 1e-6
    variants = report["variants"]
    assert {"routed", "dense"} <= set(variants) and sum(k.startswith("expert ") for k in variants) == 4
    assert all({"top1", "top5", "buckets", "flops_per_image"} <= set(v) for v in variants.values())
    assert set(report["routed_beats"]) == {"dense", "best_single_expert"}
    for figure in ("routing_heatmap.png", "tsne.png"):
        assert (eval_report / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (eval_report / "report.md").read_text()
    assert "## Accuracy" in markdown and "| dense |" in markdown and "routing_heatmap.png" in markdown


@pytest.mark.slow
def test_ablate_has_a_row_per_k_and_per_subset(trained_run, tiny_dataset, tmp_path):
    from mgmoe_ds.cli import main

    assert main(["ablate", "--checkpoint", str(trained_run), "--data", str(tiny_dataset), "--out", str(tmp_path),
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "ablation.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert [r["k"] for r in report["rows"] if r["kind"] == "top_k"] == [1, 2, 3, 4]
    subsets = [r for r in report["rows"] if r["kind"] == "subset"]
    assert len(subsets) == 6 + 4 + 1 and all(len(r["experts"]) == r["k"] >= 2 for r in subsets)
    assert rows["top-1"]["flops_per_image"] < rows["top-2"]["flops_per_image"] < rows["top-4"]["flops_per_image"]
    assert all(0 <= r["top1"] <= 1 and abs(r["experts_per_image"] - r["k"]) < 1e-6 for r in subsets)
    # all four experts fused with router weights is dense fusion: the same as top-4
    assert rows["{mpsa+pmg+transfg+pim} k=4"]["top1"] == rows["top-4"]["top1"]
    assert "| top-2 |" in (tmp_path / "ablation.md").read_text()


def extract_split(dataset: Path, split: str, folder: Path) -> dict[str, Path]:
    """Writes a split's images out of its shards; returns key -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for shard in sorted(dataset.glob(f"*-{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext in ("jpg", "jpeg", "png"):
                    path = folder / f"{key.replace('/', '_')}.{ext}"
                    path.write_bytes(tar.extractfile(member).read())
                    files[key] = path
    assert files, f"no {split} images in {dataset}"
    return files


@pytest.mark.slow
def test_predict_on_the_export_agrees_with_eval_and_reports_bad_files(trained_run, eval_report, tiny_dataset,
                                                                      tmp_path):
    from mgmoe_ds.cli import main

    exported = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(trained_run), "--out", str(exported)]) == 0
    images = extract_split(tiny_dataset, "test", tmp_path / "images")
    (tmp_path / "images" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (tmp_path / "images" / "zz_notes.txt").write_text("not an image")
    result = mgmoe("predict", "--model", str(exported), str(tmp_path / "images"))
    assert result.returncode == 1, result.stderr[-3000:]  # some files failed; the others were predicted
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(images) + 2
    errors = {Path(r["file"]).name for r in records if "error" in r}
    assert errors == {"zz_corrupt.jpg", "zz_notes.txt"}
    predicted = {Path(r["file"]).stem: r for r in records if "error" not in r}
    evaluated = [json.loads(line) for line in (eval_report / "predictions.jsonl").read_text().splitlines()]
    assert len(evaluated) == len(images)
    for row in evaluated:
        record = predicted[row["key"].replace("/", "_")]
        assert record["top5"][0]["index"] == row["predicted"], row["key"]
        # the same preprocessing and routing: the same ranking and probabilities, not only the same top-1
        assert [s["index"] for s in record["top5"]] == row["top5"], row["key"]
        probabilities = [s["probability"] for s in record["top5"]]
        assert probabilities == pytest.approx(row["top5_probabilities"], abs=1e-4), row["key"]
        assert len(record["top5"]) == 4 and abs(sum(s["probability"] for s in record["top5"]) - 1) < 1e-4
        assert len(record["experts"]) == 2 and abs(sum(e["weight"] for e in record["experts"]) - 1) < 1e-4


@pytest.mark.slow
def test_export_of_an_expert_parallel_run_equals_the_export_of_the_data_parallel_run(two_rank_runs, tmp_path):
    # Two real runs of the same job on two ranks, at P = 2 and at P = 1 (see two_rank_runs).
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mgmoe_ds.export import export_model

    exports = {}
    for ep in (1, 2):
        run = two_rank_runs[ep]["run"]
        tag = json.loads((run / "checkpoints" / "last_good.json").read_text())["tag"]
        folder = run / "checkpoints" / tag
        assert len(list(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 4
        exports[ep] = load_file(str(export_model(run, tmp_path / f"p{ep}.safetensors")))
        # every expert tensor is the one DeepSpeed wrote for that global expert
        for expert_file in folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
            for key, value in torch.load(expert_file, map_location="cpu", weights_only=True).items():
                assert torch.equal(exports[ep]["model." + key], value), key
    assert exports[2].keys() == exports[1].keys()
    for key in exports[2]:
        # equal up to fp32 summation order (the training equivalence test says why 1e-4)
        torch.testing.assert_close(exports[2][key], exports[1][key], atol=1e-4, rtol=0, msg=key)
    assert {k.split(".")[5] for k in exports[2] if k.startswith("model.moe.deepspeed_moe.")} == {"0", "1", "2", "3"}
    with safe_open(str(tmp_path / "p2.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["preprocessing"])["img_size"] == 32
    assert len(json.loads(metadata["class_names"])) == 4
    assert json.loads(metadata["routing"])["kind"] == "cluster" and "routing.centroids" in exports[2]
