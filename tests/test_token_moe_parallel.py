"""A backbone MoE block on real gloo ranks: P = 2 equals P = 1, and checkpoints reshard across P."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_utils import run_ranks

pytestmark = pytest.mark.slow

WIDTH, EXPERTS = 8, 8


def _block(ep_size: int, ep_rank: int, *, hard=None, num_experts=EXPERTS, **options):
    """A residual block whose MLP is a token-level MoE, every expert upcycled from one dense MLP."""
    from mgmoe_ds.moe.token_layer import BatchedRoutedExperts, TokenMoE

    torch.manual_seed(11)
    dense = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH))
    torch.manual_seed(12)  # the router's init, whatever P is
    routed = BatchedRoutedExperts(num_experts, (WIDTH, 2 * WIDTH, WIDTH), router_dim=WIDTH, top_k=2,
                                  expert_parallel_size=ep_size, expert_parallel_rank=ep_rank, **options)
    routed.local_experts.upcycle([(dense[0].weight, dense[0].bias), (dense[1].weight, dense[1].bias)], noise=0.5,
                                 seeds=[100 + g for g in routed.global_expert_ids])
    return TokenMoE("blocks.0", routed, layout="channels_first", granularity="token", soft=True,
                    hard_threshold=hard, hard_momentum=0.5)


def _step(block, x, upstream):
    from mgmoe_ds.moe.token_layer import collect_token_moe

    x = x.clone().requires_grad_(True)
    with collect_token_moe() as collector:
        y = x + block(x)  # the residual carries dropped tokens
    record = collector.records["blocks.0"]
    loss = (y * upstream).sum() + 0.1 * record.losses["importance"] + 0.1 * record.losses["load"]
    loss.backward()
    return y, x.grad, record


def _equivalence_worker(rank: int, world_size: int) -> None:
    """P = 2 on two ranks against data parallelism: the P = 1 block on each rank's images alone,
    gradients summed over ranks. Uneven images per rank with no drops; then even ones with a
    capacity that drops tokens (the group agrees on the largest rank's capacity, which data
    parallelism matches when every rank has as many tokens)."""
    import torch.distributed as dist

    from mgmoe_ds.moe.deepspeed_compat import bind_expert_parallel_group

    cases = (((3, 1), dict(dropless=True)), ((2, 2), dict(capacity_factor=0.75, min_capacity=1)),
             ((4, 4), dict(num_experts=64, capacity_factor=1.25, min_capacity=1)),  # many experts, few rows each
             ((3, 1), dict(dropless=True, chunk_experts=3)))  # chunks: 3 + 3 + 2 at P = 1, 3 + 1 per rank at P = 2
    for images, options in cases:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(sum(images), WIDTH, 3, 3, generator=g)
        upstream = torch.randn(sum(images), WIDTH, 3, 3, generator=g)
        bounds = [(sum(images[:r]), sum(images[:r + 1])) for r in range(world_size)]

        reference = _block(1, 0, **options).train()
        ref_y, ref_gx, ref_dropped = [], [], []
        for lo, hi in bounds:
            y, gx, record = _step(reference, x[lo:hi], upstream[lo:hi])
            ref_y.append(y)
            ref_gx.append(gx)
            ref_dropped.append(int(record.output.route.dropped_per_expert.sum()))

        block = _block(2, rank, **options).train()
        bind_expert_parallel_group(block.routed)
        lo, hi = bounds[rank]
        y, gx, record = _step(block, x[lo:hi], upstream[lo:hi])
        torch.testing.assert_close(y, ref_y[rank], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, ref_gx[rank], atol=1e-5, rtol=1e-5)
        if "capacity_factor" in options:
            assert sum(ref_dropped) > 0  # the case really drops choices
        local = list(block.routed.global_expert_ids)
        experts, ref_experts = block.routed.local_experts, reference.routed.local_experts
        for layer in range(experts.num_layers):  # (L, in, out) and (L, out): the chunks in expert order
            for mine, ref in zip(experts.stacked_grads(layer), ref_experts.stacked_grads(layer)):
                torch.testing.assert_close(mine, ref[local], atol=1e-5, rtol=1e-5)
        router_grad = block.routed.router.gate.weight.grad.clone()
        dist.all_reduce(router_grad)
        torch.testing.assert_close(router_grad, reference.routed.router.gate.weight.grad, atol=1e-5, rtol=1e-5)


def test_a_backbone_moe_block_at_p2_equals_p1_outputs_and_gradients():
    run_ranks(_equivalence_worker, 2)


def _hard_share_worker(rank: int, world_size: int) -> None:
    """The hard constraint's running share is one value over the group: the EMA of the mean top-2
    gate weight of every rank's tokens (here computed by hand from the gathered probabilities)."""
    import torch.distributed as dist

    from mgmoe_ds.moe.deepspeed_compat import bind_expert_parallel_group

    block = _block(2, rank, hard=0.5, dropless=True).train()
    bind_expert_parallel_group(block.routed)
    x = torch.randn(1 + rank, WIDTH, 2, 2, generator=torch.Generator().manual_seed(rank))  # 4 and 8 tokens
    _, _, record = _step(block, x, torch.zeros(1 + rank, WIDTH, 2, 2))
    probs = record.output.route.probs.detach()  # (T, E): nothing is masked yet (the share starts uniform)
    kept = probs >= probs.sort(dim=-1, descending=True).values[:, 1:2]  # (T, E): each token's top two
    gate = torch.where(kept, probs, torch.zeros(())) / (probs * kept).sum(-1, keepdim=True)  # (T, E)
    sums, counts = gate.sum(0), torch.tensor([float(probs.shape[0])])
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    expected = 0.5 * torch.full((EXPERTS,), 1.0 / EXPERTS) + 0.5 * sums / counts
    torch.testing.assert_close(block.gate_share, expected)


def test_the_hard_constraint_share_is_agreed_over_the_expert_parallel_group():
    run_ranks(_hard_share_worker, 2)


# ---------------------------------------------------------------------------------------------
# Checkpoints: saved at P = 2, loaded at P = 1 and P = 4


class _Net(nn.Module):
    def __init__(self, ep_size: int, ep_rank: int, seed: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTH, 1)
        self.block = _block(ep_size, ep_rank, dropless=True)
        torch.manual_seed(seed)  # re-randomise, so a load must really restore the experts
        for p in self.block.parameters():
            nn.init.normal_(p, std=0.3)

    def forward(self, images, targets):
        x = self.stem(images)
        return F.cross_entropy((x + self.block(x)).mean(dim=(2, 3)), targets)


DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 1000,
}


def _engine(ep_size: int, seed: int):
    import deepspeed

    from mgmoe_ds.moe.deepspeed_compat import adopt_moe_layers, expert_parallel_rank, moe_param_groups

    model = _Net(ep_size, expert_parallel_rank(ep_size), seed)
    adopt_moe_layers(model)
    groups = moe_param_groups([{"name": "all", "params": list(model.parameters())}])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=DS_CONFIG)
    return engine


def _expert_tensors(engine) -> dict[str, torch.Tensor]:
    """Global expert id -> its tensors, read through the per-expert state dict."""
    routed = engine.module.block.routed
    state = routed.local_experts.state_dict()
    result = {}
    for local, global_id in enumerate(routed.global_expert_ids):
        for key, value in state.items():
            if key.startswith(f"{local}."):
                result[f"{global_id}.{key.split('.', 1)[1]}"] = value.clone()
    return result


def _save_worker(rank: int, world_size: int, ckpt_dir: str) -> None:
    engine = _engine(2, seed=1)
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + rank)
        loss = engine(torch.randn(4, 3, 3, 3, generator=g), torch.randint(0, WIDTH, (4,), generator=g))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(ckpt_dir, tag="t2")
    torch.save(_expert_tensors(engine), Path(ckpt_dir, f"expected_rank{rank}.pt"))


def _load_worker(rank: int, world_size: int, ckpt_dir: str, ep_size: int) -> None:
    engine = _engine(ep_size, seed=3)
    before = _expert_tensors(engine)
    engine.load_checkpoint(ckpt_dir, tag="t2", load_optimizer_states=False, load_module_only=True)
    expected = {}
    for path in sorted(Path(ckpt_dir).glob("expected_rank*.pt")):
        expected.update(torch.load(path, weights_only=True))
    got = _expert_tensors(engine)
    assert len(got) == 4 * EXPERTS // ep_size  # fc1/fc2 weight and bias of each local expert
    for key, tensor in got.items():
        assert not torch.equal(before[key], tensor), f"{key} did not change on load"
        assert torch.equal(tensor, expected[key]), f"expert tensor {key} differs after loading at P={ep_size}"


def test_a_checkpoint_saved_at_p2_loads_bit_exact_at_p1_and_p4(tmp_path):
    run_ranks(_save_worker, 2, str(tmp_path))
    files = sorted(p.name for p in (tmp_path / "t2").glob("layer_*_expert_*"))
    assert files == sorted(f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(EXPERTS))  # once each
    run_ranks(_load_worker, 1, str(tmp_path), 1)
    run_ranks(_load_worker, 4, str(tmp_path), 4)
