"""The routed layer in one process (no process group): routing, capacity, fallback, modes."""

import pytest
import torch
from torch import nn

from mgmoe_ds.moe.layer import RoutedExperts
from mgmoe_ds.moe.parallel import ExpertParallelComm
from mgmoe_ds.moe.routing import RoutingRequest
from toy_experts import FEATURE_DIM, NUM_CLASSES, expert_factories, make_batch


def make_layer(**options):
    torch.manual_seed(0)
    options.setdefault("fallback_head", nn.Linear(FEATURE_DIM, NUM_CLASSES))
    return RoutedExperts(expert_factories(), router_dim=FEATURE_DIM, output_shape=(NUM_CLASSES,), **options)


def run(layer, num_tokens=16, with_targets=True, **kwargs):
    pooled, level0, targets = make_batch(num_tokens)
    return layer(pooled, {"pooled": pooled, "level0": level0}, targets if with_targets else None, **kwargs)


def test_fused_output_is_weighted_sum_of_the_chosen_experts():
    layer = make_layer(dropless=True).eval()
    pooled, level0, _ = make_batch(6)
    out = layer(pooled, {"pooled": pooled, "level0": level0})
    for t in range(6):
        expected = torch.zeros(NUM_CLASSES)
        for k in range(2):
            e = int(out.route.expert_indices[t, k])
            single = layer.local_experts[e]({"pooled": pooled[t:t + 1], "level0": level0[t:t + 1]}, None).logits[0]
            torch.testing.assert_close(out.expert_outputs[t, k], single, atol=1e-6, rtol=1e-5)
            expected += out.route.weights[t, k] * single
        torch.testing.assert_close(out.output[t], expected, atol=1e-6, rtol=1e-5)


def test_each_image_reaches_exactly_its_two_experts():
    layer = make_layer(dropless=True).train()
    pooled, level0, targets = make_batch(8)
    for t in range(8):
        layer.zero_grad()
        out = layer(pooled, {"pooled": pooled, "level0": level0})
        out.output[t].sum().backward()
        chosen = set(out.route.expert_indices[t].tolist())
        for e, expert in enumerate(layer.local_experts):
            grads = [p.grad for p in expert.parameters()]
            touched = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
            assert touched == (e in chosen), f"image {t}: expert {e} touched={touched}, chosen={chosen}"


def test_capacity_overflow_counts_and_fallback_leave_no_empty_row():
    layer = make_layer(capacity_factor=0.25, min_capacity=1).train()
    out = run(layer, num_tokens=16)
    cap = out.route.capacity
    assert cap == 2  # ceil(0.25 * 16 * 2 / 4)
    kept_per_expert = torch.bincount(out.route.expert_indices[out.route.kept], minlength=4)
    assert bool((kept_per_expert <= cap).all())
    assert torch.equal(out.route.load_per_expert - kept_per_expert, out.route.dropped_per_expert)
    assert int(out.route.dropped_per_expert.sum()) > 0
    dropped = out.route.fully_dropped
    assert int(dropped.sum()) > 0
    pooled, _, _ = make_batch(16)
    torch.testing.assert_close(out.output[dropped], layer.fallback_head(pooled[dropped]))
    assert bool((out.output.abs().sum(1) > 0).all())
    # surviving weights renormalised
    partial = out.route.kept.any(1)
    torch.testing.assert_close(out.route.weights[partial].sum(1), torch.ones(int(partial.sum())))


def test_eval_uses_eval_capacity_factor():
    layer = make_layer(capacity_factor=0.25, eval_capacity_factor=4.0, min_capacity=1)
    assert run(layer.train()).route.capacity == 2
    assert run(layer.eval()).route.capacity == 32


def test_fallback_head_is_required_when_tokens_can_drop():
    with pytest.raises(ValueError, match="fallback_head is required"):
        RoutedExperts(expert_factories(), router_dim=FEATURE_DIM, output_shape=(NUM_CLASSES,))


@pytest.mark.parametrize("bad, match", [
    (dict(top_k=5), "top_k = 5"),
    (dict(expert_parallel_size=3), "expert_parallel_size = 3"),
    (dict(capacity_factor=0.0), "capacity factors must be > 0"),
    (dict(min_capacity=0), "min_capacity = 0"),
])
def test_bad_layer_arguments_fail_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        make_layer(**bad)
    assert "\n" not in str(err.value)


def test_dense_single_and_uniform_modes():
    layer = make_layer(capacity_factor=0.1, min_capacity=1).eval()
    dense = run(layer, routing=RoutingRequest.dense())
    assert dense.route.expert_indices.shape == (16, 4) and bool(dense.route.kept.all())  # dense never drops
    uniform = run(layer, routing=RoutingRequest.dense(uniform_weights=True))
    torch.testing.assert_close(uniform.output, uniform.expert_outputs.mean(1))
    single = run(layer, routing=RoutingRequest.single(2))
    assert bool((single.route.expert_indices == 2).all())
    torch.testing.assert_close(single.output, single.expert_outputs[:, 0])
    masked = run(layer, routing=RoutingRequest(top_k=2, allowed_experts=torch.tensor([True, False, True, True])))
    assert 1 not in masked.route.expert_indices.unique().tolist()


def test_losses_are_returned_not_stored_and_expert_losses_see_targets():
    layer = make_layer(dropless=True).train()
    out = run(layer)
    assert {"load_balance", "z_loss", "mapconv.ce"} == set(out.aux_losses)  # raw: the model weighs them
    assert "mapconv.ce" not in run(layer, with_targets=False).aux_losses
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for v in vars(layer).values())


def test_idle_experts_get_zero_gradients_not_none():
    layer = make_layer(dropless=True).train()
    pooled, level0, targets = make_batch(1)
    out = layer(pooled, {"pooled": pooled, "level0": level0}, targets, routing=RoutingRequest(top_k=1))
    (out.output.sum() + sum(out.aux_losses.values())).backward()
    idle = set(range(4)) - set(out.route.expert_indices[0].tolist())
    for e in idle:
        for p in layer.local_experts[e].parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) == 0.0


def test_wrong_expert_output_shape_is_reported():
    layer = RoutedExperts(expert_factories(), router_dim=FEATURE_DIM, output_shape=(NUM_CLASSES + 1,), dropless=True)
    with pytest.raises(RuntimeError, match=r"returned shape \(\d+, 5\), expected \(\d+, 6\)"):
        run(layer)


def test_zero_tokens_still_run():
    layer = make_layer().train()
    out = run(layer, num_tokens=0)
    assert out.output.shape == (0, NUM_CLASSES)
    (out.output.sum() + sum(out.aux_losses.values())).backward()


def test_world_size_one_comm_is_identity():
    comm = ExpertParallelComm(None)
    x = torch.randn(3, 2)
    assert comm.exchange(x, [3], [3]) is x and comm.max_int(5, x.device) == 5
    assert comm.exchange_counts(torch.tensor([1, 2])).tolist() == [[1, 2]]


def test_only_local_experts_are_built_under_expert_parallelism():
    layer = RoutedExperts(expert_factories(), router_dim=FEATURE_DIM, output_shape=(NUM_CLASSES,),
                          dropless=True, expert_parallel_size=2, expert_parallel_rank=1)
    assert len(layer.local_experts) == 2 and list(layer.global_expert_ids) == [2, 3]
    names = list(layer.state_dict())
    assert any(n.startswith("deepspeed_moe.experts.deepspeed_experts.1.") for n in names)
    # DeepSpeed saves every key containing "expert" as expert state: router/fallback must not.
    assert all("expert" not in n for n in names if not n.startswith("deepspeed_moe."))


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_task_loss_trains_the_router_at_top_1_as_at_top_2(top_k):
    # At K = 1 a weight renormalised over one choice is 1 and the router gets no gradient; the
    # gate probability itself (Switch) carries it.
    layer = make_layer(dropless=True).train()
    pooled, level0, targets = make_batch(16)
    out = layer(pooled, {"pooled": pooled, "level0": level0}, targets, routing=RoutingRequest(top_k=top_k))
    torch.nn.functional.cross_entropy(out.output, targets).backward()
    assert float(layer.router.gate.weight.grad.norm()) > 1e-3
    if top_k == 1:
        chosen = out.route.probs.gather(1, out.route.expert_indices)  # (T, 1)
        torch.testing.assert_close(out.route.weights, chosen)  # the gate probability, not renormalised
        torch.testing.assert_close(out.output, chosen * out.expert_outputs[:, 0])


def test_a_dropless_request_keeps_every_choice_under_a_tiny_capacity():
    layer = make_layer(capacity_factor=0.1, min_capacity=1).train()
    assert int(run(layer).route.dropped_per_expert.sum()) > 0
    assert int(run(layer, routing=RoutingRequest(dropless=True)).route.dropped_per_expert.sum()) == 0
