"""Expert parallelism on real gloo ranks with DeepSpeed's process groups and ZeRO-2 checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_utils import run_ranks
from mgmoe_ds.config import MoEConfig
from mgmoe_ds.model import loss_weights, weighted_loss
from mgmoe_ds.moe.routing import RoutingRequest
from toy_experts import FEATURE_DIM, NUM_CLASSES, expert_factories, make_batch

pytestmark = pytest.mark.slow


def _layer(ep_size: int, ep_rank: int, **options):
    from mgmoe_ds.moe.layer import RoutedExperts

    torch.manual_seed(7)
    fallback = nn.Linear(FEATURE_DIM, NUM_CLASSES)
    return RoutedExperts(expert_factories(), router_dim=FEATURE_DIM, output_shape=(NUM_CLASSES,),
                         fallback_head=fallback, expert_parallel_size=ep_size, expert_parallel_rank=ep_rank,
                         **options)


def _step(layer, pooled, level0, targets, loss_weights):
    pooled = pooled.clone().requires_grad_(True)
    level0 = level0.clone().requires_grad_(True)
    out = layer(pooled, {"pooled": pooled, "level0": level0}, targets)
    expert_loss = sum(v for k, v in out.aux_losses.items() if k not in ("load_balance", "z_loss"))
    loss = (out.output * loss_weights).sum() + expert_loss
    loss.backward()
    return out, pooled.grad, level0.grad


def _equivalence_worker(rank: int, world_size: int, out_dir: str) -> None:
    """P = 2 on two ranks against plain data parallelism: the same layer at P = 1 run on each
    rank's tokens separately, its gradients summed over ranks (DeepSpeed then divides both by
    the world size alike). The toy expert's own loss is a mean, so an expert loss that weighs
    1/P of its data-parallel weight, or averages over all sources' rows at once, fails here."""
    import torch.distributed as dist

    from mgmoe_ds.moe.deepspeed_compat import bind_expert_parallel_group

    report = {}
    # (tokens per rank, layer options): an uneven split with no drops; then every token on
    # rank 0 and none on rank 1 (the last batch of a stream) with capacity overflow.
    cases = {
        "split_7_5_dropless": ((7, 5), dict(dropless=True)),
        "split_12_0_overflow": ((12, 0), dict(capacity_factor=0.5, min_capacity=1)),
    }
    for case, (sizes, options) in cases.items():
        total = sum(sizes)
        pooled, level0, targets = make_batch(total, seed=3)
        loss_weights = torch.randn(total, NUM_CLASSES, generator=torch.Generator().manual_seed(5))
        bounds = [(sum(sizes[:r]), sum(sizes[:r + 1])) for r in range(world_size)]

        reference = _layer(1, 0, **options).train()
        ref_outputs, ref_gp, ref_gl, ref_dropped = [], [], [], None
        for lo, hi in bounds:  # data parallelism: each rank's tokens alone, gradients summed
            if hi == lo:
                continue
            ref_out, gp, gl = _step(reference, pooled[lo:hi], level0[lo:hi], targets[lo:hi], loss_weights[lo:hi])
            ref_outputs.append(ref_out.output)
            ref_gp.append(gp)
            ref_gl.append(gl)
            if lo == 0:
                ref_dropped, ref_capacity = ref_out.route.dropped_per_expert.tolist(), ref_out.route.capacity
        ref_output, ref_gp, ref_gl = torch.cat(ref_outputs), torch.cat(ref_gp), torch.cat(ref_gl)

        layer = _layer(2, rank, **options).train()
        bind_expert_parallel_group(layer)
        lo, hi = bounds[rank]
        out, gp, gl = _step(layer, pooled[lo:hi], level0[lo:hi], targets[lo:hi], loss_weights[lo:hi])

        torch.testing.assert_close(out.output, ref_output[lo:hi], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gp, ref_gp[lo:hi], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gl, ref_gl[lo:hi], atol=1e-5, rtol=1e-5)
        for local_id, global_id in enumerate(layer.global_expert_ids):
            for (name, p), (_, q) in zip(layer.local_experts[local_id].named_parameters(),
                                         reference.local_experts[global_id].named_parameters()):
                assert p.grad is not None, f"expert {global_id} {name} got no gradient"
                torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
        router_grad = layer.router.gate.weight.grad.clone()
        dist.all_reduce(router_grad)
        torch.testing.assert_close(router_grad, reference.router.gate.weight.grad, atol=1e-5, rtol=1e-5)
        if not options.get("dropless"):
            assert out.route.capacity == ref_capacity  # agreed over the group
        # Every row has an output: no token silently gets zeros.
        assert bool((out.output.abs().sum(dim=1) > 0).all())
        report[case] = {
            "capacity": out.route.capacity,
            "dropped_per_expert": out.route.dropped_per_expert.tolist(),
            "fully_dropped": int(out.route.fully_dropped.sum()),
            "ref_dropped_per_expert": ref_dropped if rank == 0 else None,
            "expert_losses": {k: float(v) for k, v in out.aux_losses.items() if k == "mapconv.ce"},
        }
    Path(out_dir, f"equivalence_rank{rank}.json").write_text(json.dumps(report))


def test_p2_matches_p1_outputs_and_gradients_with_uneven_ranks_and_overflow(tmp_path):
    run_ranks(_equivalence_worker, 2, str(tmp_path))
    rank0 = json.loads((tmp_path / "equivalence_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "equivalence_rank1.json").read_text())
    overflow = rank0["split_12_0_overflow"]
    # 12 tokens, K=2, E=4, factor 0.5 -> 3 slots per expert: drops must have happened and match P=1.
    assert overflow["capacity"] == 3 == rank1["split_12_0_overflow"]["capacity"]
    assert sum(overflow["dropped_per_expert"]) > 0
    assert overflow["dropped_per_expert"] == overflow["ref_dropped_per_expert"]
    assert rank1["split_12_0_overflow"]["dropped_per_expert"] == [0, 0, 0, 0]
    assert sum(rank0["split_7_5_dropless"]["dropped_per_expert"]) == 0
    # both ranks hold a MapConv expert with its own (mean-reduced) loss, so the case tests it
    assert rank0["split_7_5_dropless"]["expert_losses"] and rank1["split_7_5_dropless"]["expert_losses"]


def _idle_rank_worker(rank: int, world_size: int) -> None:
    """No payload gradient (frozen backbone) and every token routed to rank 0's experts: rank 1's
    experts receive no rows. Backward must still run the same collectives on both ranks."""
    from mgmoe_ds.moe.deepspeed_compat import bind_expert_parallel_group

    pooled, level0, targets = make_batch(8, seed=4)
    allowed = torch.tensor([True, True, False, False])
    reference = _layer(1, 0, dropless=True).train()
    ref = reference(pooled, {"pooled": pooled, "level0": level0}, routing=RoutingRequest(allowed_experts=allowed))
    ref.output.sum().backward()
    layer = _layer(2, rank, dropless=True).train()
    bind_expert_parallel_group(layer)
    lo, hi = 4 * rank, 4 * rank + 4
    out = layer(pooled[lo:hi], {"pooled": pooled[lo:hi], "level0": level0[lo:hi]},
                routing=RoutingRequest(allowed_experts=allowed))
    out.output.sum().backward()  # hangs without the gradient anchor
    torch.testing.assert_close(out.output, ref.output[lo:hi], atol=1e-5, rtol=1e-5)
    if rank == 0:
        for local_id in range(2):
            for p, q in zip(layer.local_experts[local_id].parameters(), reference.local_experts[local_id].parameters()):
                torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)


def test_backward_completes_when_a_rank_gets_no_rows_and_no_payload_gradient():
    run_ranks(_idle_rank_worker, 2, timeout=120)


class _Net(nn.Module):
    def __init__(self, ep_size: int, ep_rank: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(FEATURE_DIM, FEATURE_DIM)
        self.moe = _layer(ep_size, ep_rank, capacity_factor=2.0)
        torch.manual_seed(seed)  # re-randomise experts so a load must really restore them
        for p in self.moe.parameters():
            nn.init.normal_(p, std=0.3)

    def forward(self, level0, targets):
        pooled = self.stem(level0.mean(dim=(2, 3)))
        out = self.moe(pooled, {"pooled": pooled, "level0": level0}, targets)
        losses = {f"moe.{name}": value for name, value in out.aux_losses.items()}  # as MGMoE names them
        return F.cross_entropy(out.output, targets) + weighted_loss(losses, loss_weights(MoEConfig()))


DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 6,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 1000,
}


def _engine(ep_size: int, ep_rank: int, seed: int):
    import deepspeed

    from mgmoe_ds.moe.deepspeed_compat import adopt_moe_layers, moe_param_groups

    model = _Net(ep_size, ep_rank, seed)
    adopt_moe_layers(model)
    groups = moe_param_groups([{"name": "all", "params": [p for p in model.parameters()]}])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=DS_CONFIG)
    return engine


def _expert_tensors(engine) -> dict[str, torch.Tensor]:
    layer = engine.module.moe
    result = {}
    for local_id, global_id in enumerate(layer.global_expert_ids):
        for name, t in layer.local_experts[local_id].state_dict().items():
            result[f"{global_id}.{name}"] = t.detach().clone()
    return result


def _save_worker(rank: int, world_size: int, ckpt_dir: str) -> None:
    from mgmoe_ds.moe.deepspeed_compat import expert_parallel_rank

    ep_rank = expert_parallel_rank(2)
    engine = _engine(2, ep_rank, seed=1)
    for step in range(3):
        _, level0, targets = make_batch(6, seed=10 + step * world_size + rank)
        loss = engine(level0, targets)
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(ckpt_dir, tag="t3")
    saved = _expert_tensors(engine)
    torch.save(saved, Path(ckpt_dir, f"expected_rank{rank}.pt"))
    # Reload at P = 2 into freshly (differently) initialised engines: bit-identical experts.
    fresh = _engine(2, ep_rank, seed=2)
    assert any(not torch.equal(saved[k], v) for k, v in _expert_tensors(fresh).items())
    fresh.load_checkpoint(ckpt_dir, tag="t3")
    for key, tensor in _expert_tensors(fresh).items():
        assert torch.equal(tensor, saved[key]), f"expert tensor {key} differs after reload at P=2"


def _load_p1_worker(rank: int, world_size: int, ckpt_dir: str) -> None:
    engine = _engine(1, 0, seed=3)
    engine.load_checkpoint(ckpt_dir, tag="t3", load_optimizer_states=False, load_module_only=True)
    expected = {}
    for path in sorted(Path(ckpt_dir).glob("expected_rank*.pt")):
        expected.update(torch.load(path, weights_only=True))
    got = _expert_tensors(engine)
    assert sorted(got) == sorted(expected)
    for key, tensor in got.items():
        assert torch.equal(tensor, expected[key]), f"expert tensor {key} differs after loading at P=1"


def test_zero2_checkpoint_saved_at_p2_loads_bit_exact_at_p2_and_p1(tmp_path):
    run_ranks(_save_worker, 2, str(tmp_path))
    files = sorted(p.name for p in (tmp_path / "t3").glob("layer_*_expert_*"))
    assert files == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]
    run_ranks(_load_p1_worker, 1, str(tmp_path))
