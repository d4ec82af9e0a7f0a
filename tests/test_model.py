"""MG-MoE as one module in one process: routing semantics, modes, outputs, accounting."""

import pytest
import torch

from conftest import TINY_MGMOE
from mgmoe_ds.config import config_from_dict
from mgmoe_ds.experts import list_experts
from mgmoe_ds.model import MGMoE

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
    # each routed expert's own losses are present (pmg and pim always have some)
    routed = {model.expert_names[e] for e in out.route.expert_indices.flatten().tolist()}
    for name in routed & {"pmg", "pim"}:
        assert any(k.startswith(f"{name}.") for k in out.losses)
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
        dense = model(x, mode="dense")
        assert dense.route.expert_indices.shape == (3, 4)
        for e in range(4):
            single = model(x, mode="single", single_expert=e)
            assert bool((single.route.expert_indices == e).all())
            direct = model.moe.local_experts[e]({k: v for k, v in model.forward_features(x).items()
                                                 if k in model.moe.local_experts[e].required_features}, None).logits
            torch.testing.assert_close(single.logits, direct, atol=1e-5, rtol=1e-5)


def test_parameter_groups_cover_every_parameter_once(model):
    groups = model.parameter_groups()
    assert list(groups) == ["backbone", "router", "fallback", "experts", "expert_heads"]
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


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
