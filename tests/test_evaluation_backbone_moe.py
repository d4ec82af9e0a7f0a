"""``mgmoe eval``'s backbone MoE section: which experts are switched off, and the hard constraint's mask."""

from __future__ import annotations

import torch

from mgmoe_ds.evaluation.backbone_moe import backbone_moe_report, plan_switch_off, render_backbone_moe


def test_an_expert_no_token_reached_is_not_switched_off():
    # (images, E) routing mass: expert 2 never used (say, masked by the hard constraint)
    mass = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.0, 0.0, 0.8]])
    assert plan_switch_off({"blocks.5.1": mass}) == {"blocks.5.1": [0, 1, 3]}


def test_the_report_names_the_experts_the_hard_constraint_masks(tmp_path):
    mass = torch.tensor([[0.5, 0.5, 0.0], [0.4, 0.6, 0.0], [0.9, 0.1, 0.0]])  # (images, E)
    labels = torch.tensor([0, 1, 1])
    report = backbone_moe_report({"blocks.5.1": mass, "blocks.5.3": mass}, labels, ["a", "b"], 0.5, None, tmp_path,
                                 masked={"blocks.5.1": [2]})
    assert report["blocks.5.1"]["masked_by_hard_constraint"] == [2]
    assert report["blocks.5.3"]["masked_by_hard_constraint"] == []
    lines = render_backbone_moe(report)
    masked_lines = [line for line in lines if "hard constraint" in line]
    assert masked_lines == ["- Masked by the hard constraint (over its threshold when training ended; evaluated "
                            "without them, as trained): expert 2."]
    assert (tmp_path / report["blocks.5.1"]["figure"]).exists()
