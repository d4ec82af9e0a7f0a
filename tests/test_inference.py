"""Using a trained MG-MoE in one process: load, export (any P) and predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_MGMOE


def mgmoe(*args: str) -> subprocess.CompletedProcess:
    """The console script in a fresh process (no launcher, no RANK variables)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return subprocess.run([sys.executable, "-m", "mgmoe_ds.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# Without training: the loader's contracts on synthetic files


def tiny_model_and_meta(seed: int = 0):
    from mgmoe_ds.config import config_from_dict
    from mgmoe_ds.inference import InferenceMeta, build_model, inference_config, preprocessing_for
    from mgmoe_ds.moe.routing import ClusterRouting, RoutingRequest

    config = inference_config(config_from_dict({"model": TINY_MGMOE["model"], "moe": TINY_MGMOE["moe"]}))
    torch.manual_seed(seed)
    model = build_model(config, 4)
    routing = RoutingRequest(top_k=2, clusters=ClusterRouting(torch.randn(3, model.backbone.info.pooled_dim),
                                                              torch.tensor([[0, 1], [2, 3], [1, 3]])))
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
    assert loaded_meta.routing.clusters is not None and loaded_meta.routing.top_k == 2
    assert torch.equal(loaded_meta.routing.clusters.cluster_experts, meta.routing.clusters.cluster_experts)
    assert torch.equal(loaded_meta.routing.clusters.centroids, meta.routing.clusters.centroids)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randn(5, 3, 32, 32)
    a, b = routed_forward(model, meta, images), routed_forward(loaded, loaded_meta, images)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.route.expert_indices, b.route.expert_indices)
    # cluster routing: each image's experts are its cluster's pair
    from mgmoe_ds.moe.routing import nearest_centroid

    clusters = nearest_centroid(b.pooled, loaded_meta.routing.clusters.centroids)
    for row, cluster in enumerate(clusters.tolist()):
        allowed = meta.routing.clusters.cluster_experts[cluster].tolist()
        assert set(b.route.expert_indices[row].tolist()) <= set(allowed)


def test_an_export_names_tensors_by_what_they_are_and_one_expert_loads_on_its_own(tmp_path):
    from safetensors.torch import load_file

    from mgmoe_ds.experts import create_expert
    from mgmoe_ds.export import save_export

    model, meta = tiny_model_and_meta()
    tensors = load_file(str(save_export(model, meta, tmp_path / "model.safetensors")))
    tops = {name.split(".")[0] for name in tensors}
    assert tops == {"backbone", "router", "fallback", "experts", "routing"}
    assert "router.gate.weight" in tensors and "fallback.1.weight" in tensors
    assert not any("deepspeed" in name or name.startswith("model.") for name in tensors)
    # a user's own code: PMG's weights into a PMG expert built alone, and the same logits
    spec = meta.config.model.experts[1]
    pmg = create_expert("pmg", info=model.backbone.info, num_classes=4, **spec.options).eval()
    pmg.load_state_dict({k[len("experts.pmg."):]: v for k, v in tensors.items() if k.startswith("experts.pmg.")})
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(images)
        inside = model.moe.local_experts[1]({k: features[k] for k in pmg.required_features}, None).logits
        alone = pmg({k: features[k] for k in pmg.required_features}, None).logits
    torch.testing.assert_close(alone, inside, rtol=0, atol=0)


def test_exports_of_the_earlier_format_still_load(tmp_path):
    from safetensors.torch import save_file

    from mgmoe_ds.export import LEGACY_FORMAT, export_tensors
    from mgmoe_ds.inference import load_trained

    model, meta = tiny_model_and_meta()
    _, metadata = export_tensors(model, meta)
    legacy = {"model." + k: v.contiguous() for k, v in model.state_dict().items()}  # the format before names
    legacy["routing.centroids"] = meta.routing.clusters.centroids
    legacy["routing.cluster_experts"] = meta.routing.clusters.cluster_experts
    save_file(legacy, str(tmp_path / "old.safetensors"), metadata=dict(metadata, format=LEGACY_FORMAT))
    loaded, _ = load_trained(tmp_path / "old.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("mode", ["topk", "cluster"])
def test_a_run_ending_with_the_routing_stage_evaluates_and_exports_through_the_gate_only_with_cluster(mode, tmp_path):
    """``moe.routing``: the final routing stage's inference routing is the cluster gate ("cluster")
    or the router's free Top-K ("topk"), and the export carries (or not) the gate's tensors."""
    import dataclasses

    from mgmoe_ds.config import config_from_dict
    from mgmoe_ds.curriculum import ClusterState
    from mgmoe_ds.export import save_export
    from mgmoe_ds.inference import load_trained, routed_forward, trained_routing
    from mgmoe_ds.moe.routing import nearest_centroid

    model, meta = tiny_model_and_meta()
    stages = [{"name": "warmup", "epochs": 1}, {"name": "routing", "epochs": 1}]
    config = config_from_dict({**TINY_MGMOE, "moe": dict(TINY_MGMOE["moe"], routing=mode),
                               "curriculum": {"stages": stages}})
    teacher = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.3, 0.1, 0.5, 0.1]])  # top 2 by row
    torch.manual_seed(1)
    state = ClusterState(centroids=torch.randn(3, model.backbone.info.pooled_dim), teacher=teacher,
                         scores=teacher.log(), val_counts=torch.ones(3), train_counts=torch.ones(3))
    routing = trained_routing(config, config.curriculum.stages[-1], state.state_dict())
    assert routing.top_k == 2 and routing.to_json()["kind"] == ("cluster" if mode == "cluster" else "topk")
    meta = dataclasses.replace(meta, routing=routing, final_stage="routing")
    loaded, loaded_meta = load_trained(save_export(model, meta, tmp_path / "model.safetensors"))
    images = torch.randn(6, 3, 32, 32)
    out = routed_forward(loaded, loaded_meta, images)
    if mode == "topk":
        assert loaded_meta.routing.clusters is None
        return
    assert loaded_meta.routing.clusters.cluster_experts.tolist() == [[3, 2], [0, 1], [2, 0]]
    assert torch.equal(loaded_meta.routing.clusters.centroids, state.centroids)
    nearest = nearest_centroid(out.pooled, state.centroids)  # (B,)
    for row, cluster in enumerate(nearest.tolist()):
        assert set(out.route.expert_indices[row].tolist()) <= set(loaded_meta.routing.clusters.cluster_experts[cluster]
                                                                  .tolist())


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
    with pytest.raises(InferenceError, match="expected one of 'mgmoe-ds/2', 'mgmoe-ds/1'"):
        load_trained(foreign)
    with pytest.raises(InferenceError, match="no such run folder"):
        load_trained(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# On a trained tiny run


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

    from mgmoe_ds.export import export_model, tensor_names
    from mgmoe_ds.inference import load_trained

    exports = {}
    for ep in (1, 2):
        run = two_rank_runs[ep]["run"]
        tag = json.loads((run / "checkpoints" / "last_good.json").read_text())["tag"]
        folder = run / "checkpoints" / tag
        assert len(list(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 4
        exports[ep] = load_file(str(export_model(run, tmp_path / f"p{ep}.safetensors")))
        # every expert tensor is the one DeepSpeed wrote for that global expert, under its readable name
        names = tensor_names(load_trained(run)[0])
        for expert_file in folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
            for key, value in torch.load(expert_file, map_location="cpu", weights_only=True).items():
                assert torch.equal(exports[ep][names[key]], value), key
    assert exports[2].keys() == exports[1].keys()
    for key in exports[2]:
        # equal up to fp32 summation order (the training equivalence test says why 1e-4)
        torch.testing.assert_close(exports[2][key], exports[1][key], atol=1e-4, rtol=0, msg=key)
    assert {k.split(".")[1] for k in exports[2] if k.startswith("experts.")} == {"mpsa", "pmg", "transfg", "pim"}
    with safe_open(str(tmp_path / "p2.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["preprocessing"])["img_size"] == 32
    assert len(json.loads(metadata["class_names"])) == 4
    assert json.loads(metadata["routing"])["kind"] == "cluster" and "routing.centroids" in exports[2]
