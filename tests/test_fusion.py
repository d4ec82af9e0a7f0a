"""The fusion head and the fusion stage: the head's weighting on hand-made routes, the stage training
only the head, its routing, its config checks, and a job whose curriculum ends with it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_MGMOE, launch_training, succeeded, write_tiny_config
from mgmoe_ds.config import ConfigError, config_from_dict
from mgmoe_ds.curriculum import ClusterState, create_stage
from mgmoe_ds.model import MGMoE
from mgmoe_ds.moe.fusion import FusionHead
from mgmoe_ds.moe.layer import RouteOutput
from mgmoe_ds.moe.routing import RoutingRequest

E, C, D = 3, 4, 5  # experts, classes, pooled width of the hand-made cases


def route(indices, weights, kept) -> RouteOutput:
    """A RouteOutput with the fields the fusion head reads set by hand."""
    indices, weights, kept = torch.tensor(indices), torch.tensor(weights), torch.tensor(kept)
    zeros = torch.zeros(indices.shape[0], E)
    return RouteOutput(logits=zeros, probs=zeros, expert_indices=indices, weights=weights, kept=kept, capacity=1,
                       load_per_expert=torch.zeros(E), dropped_per_expert=torch.zeros(E),
                       fully_dropped=~kept.any(dim=1))


# Image 0 ran experts 2 (weight 0.75) and 0 (0.25); image 1 chose 1 and 2 but lost 2 to capacity
# (its weights renormalised over the kept choice); image 2 lost both and has the fallback's logits.
ROUTE = route([[2, 0], [1, 2], [0, 1]], [[0.75, 0.25], [1.0, 0.0], [0.0, 0.0]],
              [[True, True], [True, False], [False, False]])
OUTPUTS = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [4.0, 0.0, 0.0, 8.0]],
                        [[0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                        [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])  # (B, K, C), zero where dropped
ROUTED = torch.tensor([[9.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0], [-1.0, 0.0, 1.0, 2.0]])  # the layer's output
POOLED = torch.randn(3, D, generator=torch.Generator().manual_seed(0))


def head(trained: bool = False) -> FusionHead:
    torch.manual_seed(0)
    fusion = FusionHead(D, E, C, hidden=6)
    if trained:  # a head whose correction is not zero, as after training
        with torch.no_grad():
            fusion.correction.weight.normal_(std=1.0)
            fusion.correction.bias.normal_(std=1.0)
    return fusion


def test_an_untrained_head_is_the_routers_weighted_sum_and_a_fully_dropped_image_keeps_the_fallback():
    fusion = head()
    assert not fusion.is_active  # off until its stage starts
    fused = fusion(POOLED, ROUTE, OUTPUTS, ROUTED)
    expected = torch.tensor([[0.75 * 1 + 0.25 * 4, 0.75 * 2, 0.75 * 3, 0.75 * 4 + 0.25 * 8],  # [1.75, 1.5, 2.25, 5]
                             [0.5, -1.0, 2.0, 0.0],  # its one kept expert
                             [-1.0, 0.0, 1.0, 2.0]])  # the fallback
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)
    weights, logits = fusion.fusion_weights(POOLED, ROUTE, OUTPUTS)
    torch.testing.assert_close(weights, torch.tensor([[0.25, 0.0, 0.75], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
                               atol=1e-7, rtol=0)
    assert logits[0, 1].abs().sum() == 0 and logits[1, 2].abs().sum() == 0 and logits[2].abs().sum() == 0


def test_an_expert_an_image_did_not_run_contributes_nothing_even_to_a_trained_head():
    fusion = head(trained=True)
    fused = fusion(POOLED, ROUTE, OUTPUTS, ROUTED)
    weights, _ = fusion.fusion_weights(POOLED, ROUTE, OUTPUTS)
    noisy = OUTPUTS.clone()
    noisy[1, 1] = torch.tensor([50.0, -30.0, 7.0, 2.0])  # image 1's dropped choice
    noisy[2] = 11.0  # image 2 ran nothing
    # the dropped choice named another expert: which one does not matter either
    other = route([[2, 0], [1, 0], [2, 0]], ROUTE.weights.tolist(), ROUTE.kept.tolist())
    for outputs, routing in ((noisy, ROUTE), (OUTPUTS, other), (noisy, other)):
        assert torch.equal(fusion(POOLED, routing, outputs, ROUTED), fused)
        assert torch.equal(fusion.fusion_weights(POOLED, routing, outputs)[0], weights)
    assert weights[0, 1] == 0 and weights[1, 0] == 0 and weights[1, 2] == 0 and weights[2].abs().sum() == 0
    logits = fusion.fusion_weights(POOLED, ROUTE, noisy)[1]  # (B, E, C): the declared zero, whatever the slot held
    assert logits[1, 2].abs().sum() == 0 and logits[2].abs().sum() == 0 and torch.equal(logits[1, 1], noisy[1, 0])
    assert torch.equal(fused[2], ROUTED[2])  # fallback, trained head or not


def test_a_trained_head_softmaxes_its_correction_over_only_the_experts_the_image_ran():
    fusion = head()
    with torch.no_grad():  # delta = the bias alone: expert 1's large correction must not reach image 0
        fusion.correction.bias.copy_(torch.tensor([1.0, 5.0, -0.5]))
    weights, _ = fusion.fusion_weights(POOLED, ROUTE, OUTPUTS)
    e0, e2 = 0.25 * math.exp(1.0), 0.75 * math.exp(-0.5)  # router weight x exp(delta), experts 0 and 2
    expected = torch.tensor([[e0 / (e0 + e2), 0.0, e2 / (e0 + e2)], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
    fused = fusion(POOLED, ROUTE, OUTPUTS, ROUTED)
    w0, w2 = e0 / (e0 + e2), e2 / (e0 + e2)
    torch.testing.assert_close(fused[0], w2 * OUTPUTS[0, 0] + w0 * OUTPUTS[0, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(fused[1], OUTPUTS[1, 0], atol=1e-6, rtol=0)


def test_at_top_1_the_head_keeps_the_gate_probabilitys_scale_as_switch_does():
    fusion = head(trained=True)
    top1 = route([[1], [2]], [[0.6], [0.9]], [[True], [True]])
    outputs = torch.tensor([[[1.0, -2.0, 0.5, 3.0]], [[2.0, 2.0, -1.0, 0.0]]])  # (B, 1, C)
    fused = fusion(POOLED[:2], top1, outputs, torch.zeros(2, C))
    torch.testing.assert_close(fused, torch.tensor([[0.6, -1.2, 0.3, 1.8], [1.8, 1.8, -0.9, 0.0]]), atol=1e-6, rtol=0)


def test_gradients_are_finite_with_a_fully_dropped_image_and_reach_only_its_fallback():
    fusion = head(trained=True)
    routed = ROUTED.clone().requires_grad_(True)
    outputs = OUTPUTS.clone().requires_grad_(True)
    fusion(POOLED, ROUTE, outputs, routed).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters())
    assert torch.equal(routed.grad, torch.tensor([[0.0] * C, [0.0] * C, [1.0] * C]))
    assert outputs.grad[1, 1].abs().sum() == 0 and outputs.grad[2].abs().sum() == 0  # what did not run learns nothing


def tiny_fusion_config(**changes):
    model = dict(TINY_MGMOE["model"], fusion={"hidden": 8})
    return config_from_dict(dict({"model": model, "moe": {"top_k": 2, "eval_capacity_factor": 0.25,
                                                          "min_capacity": 1}}, **changes))


@pytest.mark.parametrize("top_k", [1, 2])
def test_at_initialisation_the_active_head_gives_the_layers_own_output_drops_and_fallbacks_included(top_k):
    config = tiny_fusion_config(moe={"top_k": top_k, "eval_capacity_factor": 0.25, "min_capacity": 1})
    torch.manual_seed(0)
    model = MGMoE(config.model, config.moe, 5).eval()  # eval: no dropout; capacity 1 per expert drops choices
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(images)
        model.fusion.activate()
        fused = model(images)
    assert plain.route.fully_dropped.any()
    if top_k == 2:
        assert (plain.route.kept.sum(1) == 1).any()  # an image that lost one of its two experts
    assert not torch.equal(plain.logits, plain.layer_outputs["moe"].expert_outputs[:, 0])  # weights matter here
    torch.testing.assert_close(fused.logits, plain.logits, atol=1e-6, rtol=1e-6)


def test_a_model_without_the_head_initialises_as_before_and_the_head_is_its_own_parameter_group():
    config = tiny_fusion_config()
    torch.manual_seed(0)
    with_head = MGMoE(config.model, config.moe, 5)
    plain_config = config_from_dict({"model": TINY_MGMOE["model"], "moe": {"top_k": 2}})
    torch.manual_seed(0)
    without = MGMoE(plain_config.model, plain_config.moe, 5)
    state = with_head.state_dict()
    assert all(torch.equal(state[k], v) for k, v in without.state_dict().items())
    assert set(state) - set(without.state_dict()) == {k for k in state if k.startswith("fusion.")} != set()
    groups = with_head.parameter_groups()
    assert {id(p) for p in groups["fusion"]} == {id(p) for p in with_head.fusion.parameters()} != set()
    assert without.parameter_groups()["fusion"] == []


# ---------------------------------------------------------------------------------------------
# The stage


def clusters_for(model, seed=0) -> ClusterState:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    return ClusterState(centroids=torch.randn(2, model.backbone.info.pooled_dim, generator=g), teacher=teacher,
                        scores=teacher.log(), val_counts=torch.ones(2), train_counts=torch.ones(2))


STAGES = [{"name": "warmup", "steps": 1}, {"name": "routing", "steps": 1}, {"name": "residual", "steps": 1},
          {"name": "fusion", "steps": 3}]


def test_the_fusion_stage_routes_as_the_residual_stage_before_it_and_trains_only_the_head(world_of_one):
    from test_train_step import PlainEngine

    from mgmoe_ds.train.distributed import Collectives
    from mgmoe_ds.train.step import TrainStep, trained_groups
    from mgmoe_ds.train.trainer import Trainer

    # a backbone with BatchNorm, so that its running statistics are among what must not move
    model_block = dict(TINY_MGMOE["model"], backbone="tf_efficientnet_lite0", backbone_options={}, fusion=True)
    config = config_from_dict({"model": model_block, "moe": {"top_k": 2},
                               "curriculum": {"stages": STAGES, "num_clusters": 2}})
    torch.manual_seed(0)
    model = MGMoE(config.model, config.moe, 4)
    clusters = clusters_for(model)
    fusion = create_stage(config.curriculum.stages[3], config, base_lr=0.05)
    residual = create_stage(config.curriculum.stages[2], config, base_lr=0.05)
    assert fusion.uses_fusion and not residual.uses_fusion
    assert fusion.group_lr == {"fusion": 0.5} and not fusion.trains_backbone
    for ours, theirs in ((fusion.routing(clusters), residual.routing(clusters)),
                         (fusion.inference_routing(clusters), residual.inference_routing(clusters))):
        assert ours.to_json() == theirs.to_json() and ours.clusters is not None and ours.dropless
        assert torch.equal(ours.clusters.centroids, theirs.clusters.centroids)
    assert fusion.to_json(clusters)["routed_as"] == "residual"

    model.fusion.activate()  # as the trainer does when the stage starts
    groups = trained_groups(model, fusion)
    assert [g["name"] for g in groups] == ["fusion"]
    engine = PlainEngine(model, groups)
    step = TrainStep(fusion, fusion.routing(clusters), Collectives(torch.device("cpu")), torch.device("cpu"),
                     torch.float32, config.moe)
    before = copy.deepcopy(model.state_dict())
    Trainer._train_mode(SimpleNamespace(model=model), fusion)  # the trainer's modes for the stage
    assert not model.training and not model.backbone.training
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        batch = {"images": torch.randn(6, 3, 32, 32, generator=g), "labels": torch.randint(0, 4, (6,), generator=g)}
        result = step(engine, batch, clusters)
        assert result.finite
    after = model.state_dict()
    assert any("running_mean" in k for k in after)  # BatchNorm statistics are compared too
    moved = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert moved == {k for k in before if k.startswith("fusion.") and k != "fusion.active"}


def test_a_fusion_stage_first_in_the_curriculum_routes_top_k_and_the_other_losses_weigh_nothing():
    config = tiny_fusion_config(curriculum={"stages": [{"name": "fusion", "steps": 1},
                                                       {"name": "residual", "steps": 1}], "num_clusters": 2})
    stage = create_stage(config.curriculum.stages[0], config, base_lr=1.0)
    assert stage.routing(None) == RoutingRequest() and stage.inference_routing(None) == RoutingRequest()
    from mgmoe_ds.model import loss_weight, loss_weights

    weights = loss_weights(config.moe, stage.loss_weights())
    names = ["task", "fallback", "bbox", "moe.load_balance", "moe.z_loss", "moe.pmg.standalone", "moe.diversity",
             "moe.pmg.level1", "moe.transfg.contrastive", "blocks.5.1.importance", "blocks.5.1.load",
             "blocks.5.1.z_loss"]
    assert {name: loss_weight(name, weights) for name in names} == {name: float(name == "task") for name in names}


def test_the_trained_routing_of_a_run_ending_with_fusion_is_the_residual_stages_cluster_routing():
    from mgmoe_ds.inference import inference_config, trained_routing

    config = inference_config(tiny_fusion_config(curriculum={"stages": STAGES, "num_clusters": 2}))
    torch.manual_seed(0)
    clusters = clusters_for(MGMoE(config.model, config.moe, 4))
    routing = trained_routing(config, config.curriculum.stages[-1], clusters.state_dict())
    expected = trained_routing(config, config.curriculum.stages[2], clusters.state_dict())
    assert routing.to_json() == expected.to_json() and routing.to_json()["kind"] == "cluster"
    assert routing.clusters.cluster_experts.tolist() == [[0, 1], [3, 2]]


# ---------------------------------------------------------------------------------------------
# The config


def test_a_fusion_stage_or_lr_without_the_head_and_training_it_early_fail_in_one_line():
    stages = [{"name": "residual", "steps": 1}, {"name": "fusion", "steps": 1}]
    with pytest.raises(ConfigError) as error:
        config_from_dict({"curriculum": {"stages": stages}})
    assert str(error.value) == ("<dict>: mgmoe.model.fusion = null: expected an object or true: curriculum.stages[1] "
                                "is the fusion stage, which trains it (set mgmoe.model.fusion, e.g. true)")
    with pytest.raises(ConfigError, match=r"^<dict>: mgmoe.curriculum.stages\[0\].lr.fusion = 0.1: expected 0 or "
                                          r"absent while mgmoe.model.fusion is null$"):
        config_from_dict({"curriculum": {"stages": [{"name": "residual", "steps": 1, "lr": {"fusion": 0.1}}]}})
    with pytest.raises(ConfigError, match=r"stages\[0\].lr.fusion = 0.1: expected 0 or absent in a stage before "
                                          r"the first \"fusion\" stage"):
        config_from_dict({"model": {"fusion": True}, "curriculum": {"stages": [
            {"name": "residual", "steps": 1, "lr": {"fusion": 0.1, "router": 0.1}}, {"name": "fusion", "steps": 1}]}})
    with pytest.raises(ConfigError, match=r"mgmoe.model.fusion.hidden = 0: expected an integer >= 1"):
        config_from_dict({"model": {"fusion": {"hidden": 0}}})
    config = config_from_dict({"model": {"fusion": True}, "curriculum": {"stages": stages}})
    assert config.model.fusion.hidden == 64  # true: the defaults
    assert config_from_dict({}).model.fusion is None


def test_a_transfer_copies_the_head_but_leaves_it_off_until_this_runs_fusion_stage(tmp_path):
    from test_transfer import target_model

    from mgmoe_ds.export import save_export
    from mgmoe_ds.inference import InferenceMeta, build_model, inference_config, preprocessing_for
    from mgmoe_ds.train.transfer import load_initial_weights

    names = ["wren", "robin", "finch", "tit"]
    config = inference_config(tiny_fusion_config())
    torch.manual_seed(0)
    source = build_model(config, 4)
    with torch.no_grad():
        source.fusion.correction.weight.normal_()
    source.fusion.activate()
    meta = InferenceMeta(config=config, class_names=names, preprocessing=preprocessing_for(source),
                         routing=RoutingRequest(top_k=2), source="<test>")
    path = save_export(source, meta, tmp_path / "source.safetensors")
    target, target_config, _ = target_model(4, fusion={"hidden": 8})
    record = load_initial_weights(target, path, names, target_config)
    assert not target.fusion.is_active and "fusion.active" in record["left_at_init"]
    assert torch.equal(target.fusion.correction.weight, source.fusion.correction.weight)


# ---------------------------------------------------------------------------------------------
# A job whose curriculum ends with the fusion stage


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory, tiny_dataset) -> Path:
    tmp = tmp_path_factory.mktemp("fusion_run")
    stages = [{"name": "warmup", "steps": 3}, {"name": "routing", "steps": 3}, {"name": "residual", "steps": 3},
              {"name": "fusion", "steps": 4}]
    config = write_tiny_config(tmp / "ds.json", model=dict(TINY_MGMOE["model"], fusion={"hidden": 8}),
                               curriculum={"stages": stages, "num_clusters": 3})
    succeeded(launch_training(config, tiny_dataset, tmp / "run"))
    return tmp / "run"


@pytest.mark.slow
def test_a_run_ending_with_fusion_is_loaded_evaluated_and_exported_with_its_trained_head(fusion_run, tmp_path):
    from mgmoe_ds.export import export_model
    from mgmoe_ds.inference import load_trained, routed_forward
    from mgmoe_ds.moe.deepspeed_compat import consolidate_expert_checkpoint

    record = json.loads((fusion_run / "stages" / "3_fusion.json").read_text())
    assert record["trained_groups"] == {"fusion": pytest.approx(0.02)} and record["routed_as"] == "residual"
    assert record["feature_cache"] is not None  # the frozen backbone: trained from cached features
    assert record["routing"]["kind"] == "cluster"
    # the real trainer (DeepSpeed, ZeRO-2) changed the head and nothing else, buffers included
    before, after = (consolidate_expert_checkpoint(str(fusion_run / "checkpoints"), tag)
                     for tag in ("stage2-residual-end", "stage3-fusion-end"))
    moved = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert moved == {k for k in before if k.startswith("fusion.")}
    model, meta = load_trained(fusion_run)
    assert model.fusion.is_active and meta.final_stage == "fusion" and meta.routing.clusters is not None
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    fused = routed_forward(model, meta, images).logits
    untrained = copy.deepcopy(model)
    untrained.fusion.active.fill_(False)
    assert not torch.allclose(fused, routed_forward(untrained, meta, images).logits, atol=1e-6, rtol=0)
    exported = export_model(fusion_run, tmp_path / "model.safetensors")
    loaded, loaded_meta = load_trained(exported)
    assert loaded.fusion.is_active  # the export's routing is the run's (inference is dropless either way)
    assert torch.equal(loaded_meta.routing.clusters.cluster_experts, meta.routing.clusters.cluster_experts)
    assert torch.equal(routed_forward(loaded, loaded_meta, images).logits, fused)
