"""MG-MoE as one module in one process: routing semantics, modes, outputs, accounting."""

import pytest
import torch

from conftest import TINY_MGMOE
from mgmoe_ds.config import config_from_dict
from mgmoe_ds.experts import list_experts
from mgmoe_ds.model import MGMoE
from mgmoe_ds.moe.routing import RoutingRequest

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def model():
    config = config_from_dict({"model": TINY_MGMOE["model"], "moe": {"top_k": 2, "dropless": True}})
    torch.manual_seed(0)
    return MGMoE(config.model, config.moe, NUM_CLASSES)


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_forward_returns_fused_logits_routing_and_every_loss(model):
    model.train()
    targets = torch.tensor([0, 1, 2, 3])
    out = model(images(4), targets)
    assert out.logits.shape == (4, NUM_CLASSES) and out.expert_logits.shape == (4, 2, NUM_CLASSES)
    assert out.route.expert_indices.shape == (4, 2) and out.route.weights.shape == (4, 2)
    assert {"task", "fallback", "moe.load_balance", "moe.z_loss"} <= set(out.losses)
    # each routed expert's own losses are present (pmg and pim always have some), under the layer's name
    routed = {model.expert_names[e] for e in out.route.expert_indices.flatten().tolist()}
    for name in routed & {"pmg", "pim"}:
        assert any(k.startswith(f"moe.{name}.") for k in out.losses)
    assert set(out.routes) == {"moe"} and out.route is out.routes["moe"]
    assert all(torch.isfinite(v) for v in out.losses.values())
    fused = (out.route.weights[..., None] * out.expert_logits).sum(1)
    torch.testing.assert_close(out.logits, fused, atol=1e-5, rtol=1e-5)


def test_each_image_depends_on_exactly_its_two_experts(model):
    model.eval()  # deterministic experts; gradients still flow
    x = images(6, seed=1)
    with torch.no_grad():
        chosen = model(x).route.expert_indices
    for t in range(6):
        model.zero_grad()
        out = model(x)
        out.logits[t].sum().backward()
        for e, expert in enumerate(model.moe.local_experts):
            touched = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in expert.parameters())
            assert touched == (e in chosen[t].tolist()), f"image {t}: expert {e} ({model.expert_names[e]})"


def test_dense_and_single_expert_modes(model):
    model.eval()
    x = images(3, seed=2)
    with torch.no_grad():
        dense = model(x, routing=RoutingRequest.dense())
        assert dense.route.expert_indices.shape == (3, 4)
        for e in range(4):
            single = model(x, routing=RoutingRequest.single(e))
            assert bool((single.route.expert_indices == e).all())
            direct = model.moe.local_experts[e]({k: v for k, v in model.forward_features(x).items()
                                                 if k in model.moe.local_experts[e].required_features}, None).logits
            torch.testing.assert_close(single.logits, direct, atol=1e-5, rtol=1e-5)


def test_compute_report_counts_flops_and_active_parameters(model):
    report = model.compute_report(batch_size=2)
    flops = report["flops_per_image"]
    assert set(flops["experts"]) == {f"{i}:{n}" for i, n in enumerate(model.expert_names)}
    assert flops["backbone"] > 0 and all(v > 0 for v in flops["experts"].values())
    assert flops["backbone"] < flops["top_k"] < flops["dense"]
    # dense runs every expert on every image: at least backbone + sum of experts
    assert flops["dense"] >= 0.99 * (flops["backbone"] + sum(flops["experts"].values()))
    params = report["parameters"]
    assert params["backbone"] < params["active_per_image"] < params["total"]


def test_every_registered_expert_can_be_built_into_the_model():
    for name in list_experts():
        config = config_from_dict({"model": dict(TINY_MGMOE["model"], experts=[name, "mlp"]),
                                   "moe": {"top_k": 1, "dropless": True}})
        model = MGMoE(config.model, config.moe, NUM_CLASSES)
        assert model(images(2)).logits.shape == (2, NUM_CLASSES)


def test_every_tensor_starts_equal_at_any_expert_parallel_size():
    # P = 2's rank 1 builds only experts 2 and 3; they, and everything shared, must start as at P = 1.
    full = config_from_dict({"model": TINY_MGMOE["model"], "moe": {"top_k": 2}})
    split = config_from_dict({"model": TINY_MGMOE["model"], "moe": {"top_k": 2, "expert_parallel_size": 2}})
    torch.manual_seed(3)
    at_p1 = MGMoE(full.model, full.moe, NUM_CLASSES).state_dict()
    after_p1 = torch.rand(1)  # the caller's generator moves on the same way at any P
    torch.manual_seed(3)
    at_p2 = MGMoE(split.model, split.moe, NUM_CLASSES, expert_parallel_rank=1).state_dict()
    assert torch.equal(torch.rand(1), after_p1)
    prefix = "moe.deepspeed_moe.experts.deepspeed_experts."
    for key, tensor in at_p2.items():
        if key.startswith(prefix):  # local ids 0, 1 on rank 1 are global experts 2, 3
            local, rest = key[len(prefix):].split(".", 1)
            key = f"{prefix}{int(local) + 2}.{rest}"
        assert torch.equal(tensor, at_p1[key]), key
    assert len(at_p2) < len(at_p1)  # rank 1 really holds only part of the experts


def test_losses_are_weighted_by_exact_name_then_the_last_matching_pattern():
    from mgmoe_ds.config import MoEConfig
    from mgmoe_ds.model import loss_weight, loss_weights, weighted_loss

    weights = loss_weights(MoEConfig(load_balance_weight=0.01, z_loss_weight=0.001), {"*.load_balance": 0.0},
                           {"moe.pmg.*": 2.0, "moe.load_balance": 0.3})
    assert loss_weight("task", weights) == 1.0 and loss_weight("fallback", weights) == 0.5
    assert loss_weight("moe.load_balance", weights) == 0.3  # an exact name beats every pattern
    assert loss_weight("blocks.3.load_balance", weights) == 0.0  # the stage's pattern replaced the default
    assert loss_weight("moe.z_loss", weights) == 0.001 and loss_weight("moe.pmg.level1", weights) == 2.0
    assert loss_weight("moe.pim.levels", weights) == 1.0  # no rule: weight 1
    losses = {"task": torch.tensor(2.0), "moe.load_balance": torch.tensor(10.0), "moe.pmg.level1": torch.tensor(1.5)}
    assert float(weighted_loss(losses, weights)) == pytest.approx(2.0 + 3.0 + 3.0)


def test_every_parameter_is_in_exactly_one_group_and_heads_are_the_experts_own(model):
    from mgmoe_ds.config import PARAMETER_GROUPS

    groups = model.parameter_groups()
    assert tuple(groups) == PARAMETER_GROUPS
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    heads = {id(p) for params in model.head_parameters_by_expert().values() for p in params}
    assert {id(p) for p in groups["expert_heads"]} == heads
    assert {id(p) for p in groups["router"]} == {id(p) for p in model.moe.router.parameters()}
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.backbone.parameters()}
    assert groups["backbone_top"] == []  # no cut: the whole backbone is one group


def test_at_a_cut_the_backbones_top_is_a_group_of_its_own():
    import re

    config = config_from_dict({"model": dict(TINY_MGMOE["model"], backbone="tf_efficientnet_lite0",
                                             backbone_options={}), "cache": {"depth": 4}})
    cut = MGMoE(config.model, config.moe, NUM_CLASSES, cut_after=4)
    names = {id(p): n for n, p in cut.named_parameters()}
    groups = {g: {names[id(p)] for p in params} for g, params in cut.parameter_groups().items()}
    top = re.compile(r"^backbone\.model\.(blocks\.[56]\.|conv_head\.|bn2\.)")  # Lite0 has blocks 0..6
    assert groups["backbone_top"] == {n for n in names.values() if top.match(n)} != set()
    assert groups["backbone"] == {n for n in names.values() if n.startswith("backbone.") and not top.match(n)}


def test_every_expert_has_a_standalone_loss_on_the_images_routed_to_it(model):
    import torch.nn.functional as F

    model.eval()  # no random draws; losses are still computed with targets
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    out = model(images(6, seed=2), targets)
    labels = model.expert_labels
    assert labels == ["mpsa", "pmg", "transfg", "pim"]
    for e, label in enumerate(labels):
        # by hand: the CE of each (image, choice) that went to expert e, averaged
        rows = [(t, k) for t in range(6) for k in range(2) if int(out.route.expert_indices[t, k]) == e]
        expected = (sum(F.cross_entropy(out.expert_logits[t, k][None], targets[t][None]) for t, k in rows) / len(rows)
                    if rows else torch.tensor(0.0))
        torch.testing.assert_close(out.losses[f"moe.{label}.standalone"], expected, msg=label)


def test_diversity_is_logged_on_the_experts_each_image_ran_and_weighted_by_its_option(model):
    from mgmoe_ds.config import ConfigError, MoEConfig
    from mgmoe_ds.model import loss_weight, loss_weights, weighted_loss
    from mgmoe_ds.moe.losses import diversity_loss

    model.eval()  # deterministic experts
    targets = torch.tensor([0, 1, 2, 3])
    out = model(images(4, seed=5), targets)
    assert out.losses["moe.diversity"] <= 0
    torch.testing.assert_close(out.losses["moe.diversity"], diversity_loss(out.expert_logits, out.route.kept))
    dense = model(images(4, seed=5), targets, routing=RoutingRequest.dense())
    assert dense.expert_logits.shape[1] == model.num_experts  # a dense stage: all of them
    torch.testing.assert_close(dense.losses["moe.diversity"], diversity_loss(dense.expert_logits, dense.route.kept))
    assert "moe.diversity" not in model(images(4, seed=5)).losses  # no targets, no losses

    assert loss_weight("moe.diversity", loss_weights(MoEConfig())) == 0.0  # off by default
    assert loss_weight("moe.diversity", loss_weights(MoEConfig(diversity_weight=0.3))) == 0.3
    assert loss_weight("moe.diversity", loss_weights(MoEConfig(diversity_weight=0.3), {"*.diversity": 0.1})) == 0.1
    # at weight 0 the objective and its gradient are those without the loss
    weights = loss_weights(MoEConfig())
    without = {k: v for k, v in out.losses.items() if k != "moe.diversity"}
    parameters = [p for p in model.moe.parameters() if p.requires_grad]
    with_term = torch.autograd.grad(weighted_loss(out.losses, weights), parameters, retain_graph=True, allow_unused=True)
    reference = torch.autograd.grad(weighted_loss(without, weights), parameters, retain_graph=True, allow_unused=True)
    assert float(weighted_loss(out.losses, weights).detach()) == float(weighted_loss(without, weights).detach())
    for a, b in zip(with_term, reference):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    weighted = weighted_loss(out.losses, loss_weights(MoEConfig(diversity_weight=0.3)))
    torch.testing.assert_close(weighted, weighted_loss(without, weights) + 0.3 * out.losses["moe.diversity"])

    with pytest.raises(ConfigError, match=r"mgmoe\.moe\.diversity_weight = -0\.1: expected a number >= 0"):
        config_from_dict({"moe": {"diversity_weight": -0.1}})
