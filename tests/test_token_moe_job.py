"""The training job with token-level MoE blocks in the backbone, as a user runs it: P = 2 against
P = 1 on two ranks, then eval, export and the exported model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import EQUIVALENCE_EXPERTS, THREE_STAGES, TINY_MGMOE, launch_training, succeeded, write_tiny_config

pytestmark = pytest.mark.slow

BACKBONE_MOE = {"blocks": [1, "blocks.3"], "num_experts": 4, "capacity_factor": 2.0,
                "constraint": {"soft": {"importance_weight": 0.05, "load_weight": 0.05}}}


@pytest.fixture(scope="module")
def backbone_moe_runs(tiny_dataset, tmp_path_factory) -> dict[int, dict]:
    runs = {}
    for ep in (1, 2):
        folder = tmp_path_factory.mktemp(f"backbone_moe_p{ep}")
        config = write_tiny_config(folder / "ds.json",
                                   model=dict(TINY_MGMOE["model"], experts=EQUIVALENCE_EXPERTS, backbone_moe=BACKBONE_MOE),
                                   moe={"expert_parallel_size": ep}, curriculum=THREE_STAGES,
                                   # at P = 2 the backbone's features need every rank, so no cache is
                                   # built; P = 1 must then train from images too
                                   cache={"mode": "off"})
        result = succeeded(launch_training(config, tiny_dataset, folder / "run", ranks=2))
        runs[ep] = {"run": folder / "run", "output": result.stdout + result.stderr}
    return runs


def test_backbone_moe_job_at_p2_equals_p1_and_saves_each_expert_once(backbone_moe_runs, tmp_path):
    from safetensors.torch import load_file

    from mgmoe_ds.export import export_model

    exports = {}
    for ep, run in backbone_moe_runs.items():
        tag = json.loads((run["run"] / "checkpoints" / "last_good.json").read_text())["tag"]
        files = sorted(p.name for p in (run["run"] / "checkpoints" / tag).glob("layer_*_expert_*"))
        # two backbone blocks of 4 experts, then the head's 4: every expert once, whatever P is
        assert files == sorted(f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(3)
                               for e in range(4))
        exports[ep] = load_file(str(export_model(run["run"], tmp_path / f"p{ep}.safetensors")))
        metrics = (run["run"] / "metrics.jsonl").read_text()
        assert '"blocks.3.importance"' in metrics and '"blocks.1.load"' in metrics
        assert '"backbone_moe": {"blocks.1": {"expert_load": [' in metrics  # each block's load, per window
    assert exports[1].keys() == exports[2].keys()
    backbone_experts = [k for k in exports[2] if ".routed.experts." in k]
    assert len(backbone_experts) == 2 * 4 * 4  # blocks x experts x (fc1, fc2) x (weight, bias)
    for key in exports[2]:
        torch.testing.assert_close(exports[2][key], exports[1][key], atol=1e-4, rtol=0, msg=key)
    # the backbone MoE layers trained (in warm-up, with the backbone): not their upcycled start
    first = exports[2]["backbone.blocks.1.mlp.routed.experts.0.fc1.weight"]
    assert not torch.equal(first, exports[2]["backbone.blocks.1.mlp.routed.experts.1.fc1.weight"])


def test_eval_reports_what_each_backbone_expert_learned_and_the_export_predicts_as_the_run(backbone_moe_runs,
                                                                                           tiny_dataset, tmp_path):
    from mgmoe_ds.cli import main
    from mgmoe_ds.inference import load_trained

    run = backbone_moe_runs[2]["run"]
    assert main(["eval", "--checkpoint", str(run), "--data", str(tiny_dataset), "--out", str(tmp_path / "eval"),
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["backbone_moe"]) == {"blocks.1", "blocks.3"}
    layer = report["backbone_moe"]["blocks.3"]
    assert set(layer["switched_off_top1"]) == {"0", "1", "2", "3"} and len(layer["summary"]) == 4
    assert sum(layer["utilisation"].values()) == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "eval" / layer["figure"]).stat().st_size > 1000
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "### blocks.3" in markdown and "With one expert switched off" in markdown

    exported = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(exported)]) == 0
    from_run, meta = load_trained(run)
    from_export, _ = load_trained(exported)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = from_run(images, routing=meta.routing)
        got = from_export(images, routing=meta.routing)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.routes["blocks.1"].expert_indices, expected.routes["blocks.1"].expert_indices)
