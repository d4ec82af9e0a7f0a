"""Training-time evaluation passes (``train/passes.py``): they score the model as ``mgmoe eval`` and
inference do."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import TINY_MGMOE, write_tiny_config
from test_feature_cache import training_passes


def test_validation_routes_backbone_moe_blocks_dropless_as_the_exported_model_does(tiny_dataset, tmp_path,
                                                                                    world_of_one):
    from mgmoe_ds.config import StageConfig
    from mgmoe_ds.curriculum import create_stage
    from mgmoe_ds.inference import build_model, inference_config
    from mgmoe_ds.moe.routing import RoutingRequest

    # An evaluation capacity of 1 token per expert: a capacity-limited pass would drop most tokens.
    backbone_moe = {"blocks": [1, 3], "num_experts": 4, "eval_capacity_factor": 0.01, "min_capacity": 1}
    config_path = write_tiny_config(tmp_path / "ds.json", model=dict(TINY_MGMOE["model"], backbone_moe=backbone_moe))
    config, _, passes = training_passes(config_path, tiny_dataset, tmp_path / "run")
    stage = create_stage(StageConfig("warmup", epochs=1), config, 1e-3)  # images, not caches
    routing = RoutingRequest(top_k=2)
    result = passes.evaluate("val", routing, stage)

    # The reference: the model as inference builds it (every layer dropless), with the same weights.
    reference = build_model(inference_config(config), 4)
    reference.load_state_dict(passes.model.state_dict())
    reference.eval()
    loss_sum, images = 0.0, 0
    with torch.no_grad():
        for batch in passes.data.eval_loaders["val"]:
            logits = reference(batch["images"].float(), routing=routing).logits
            loss_sum += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
            images += int(batch["labels"].numel())
    assert result["images"] == images > 0
    assert abs(result["loss"] - loss_sum / images) < 1e-5, (result["loss"], loss_sum / images)
    # The clustering's pooled features too: inference assigns an image to a cluster by the same ones.
    with torch.no_grad():
        expected = torch.cat([reference.forward_features(batch["images"].float())["pooled"]
                              for batch in passes.batches("train", stage)])
    torch.testing.assert_close(passes.pooled_features(stage), expected, atol=1e-5, rtol=1e-5)
