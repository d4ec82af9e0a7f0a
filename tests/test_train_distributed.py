"""The trainer's collectives and DeepSpeed's gradient-order hazard, on real gloo ranks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_utils import run_ranks
from mgmoe_ds.train.distributed import (
    WorldError,
    check_expert_parallel_size,
    fixed_order_loss,
    reduces_in_arrival_order,
)


def _votes_worker(rank: int, world_size: int, out_dir: str) -> None:
    from mgmoe_ds.train.distributed import Collectives

    comm = Collectives(torch.device("cpu"))
    mine = [f"r{rank}b{i}" for i in range(3 if rank == 0 else 5)]  # rank 0 runs out first
    training = comm.agreed(mine, pad=False)
    trained = list(training)
    evaluation = comm.agreed(mine, pad=True)
    evaluated = list(evaluation)
    limited = list(comm.agreed(mine, pad=True, limit=4))
    t = torch.tensor([float(rank + 1), 10.0])
    summed = comm.sum(t)
    table = comm.per_rank([rank, 7])
    shared = comm.broadcast_from_main(torch.tensor([rank + 5.0]))
    comm.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "trained": trained, "training_ran_out": training.ran_out, "training_steps": training.steps,
        "evaluated": evaluated, "evaluation_ran_out": evaluation.ran_out, "limited": limited,
        "summed": summed.tolist(), "input_kept": t.tolist(), "table": table.tolist(), "shared": shared.tolist(),
        "min": comm.reduce_int(rank + 3, "min"), "max": comm.reduce_int(rank + 3, "max"),
        "sum": comm.reduce_int(rank + 3, "sum"),
    }))


@pytest.mark.slow
def test_every_rank_agrees_on_loop_counts_from_batches_that_exist(tmp_path):
    run_ranks(_votes_worker, 2, str(tmp_path), timeout=120)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # training stops at the first rank that runs out: 3 steps on both; rank 1's extra batches are left
    assert r0["trained"] == ["r0b0", "r0b1", "r0b2"] and r1["trained"] == ["r1b0", "r1b1", "r1b2"]
    assert (r0["training_ran_out"], r1["training_ran_out"]) == (True, False)
    assert r0["training_steps"] == r1["training_steps"] == 3
    # evaluation goes on while any rank has a batch; the rank that ran out gets None
    assert r0["evaluated"] == ["r0b0", "r0b1", "r0b2", None, None]
    assert r1["evaluated"] == [f"r1b{i}" for i in range(5)]
    assert r0["evaluation_ran_out"] and r1["evaluation_ran_out"]  # a padded pass ends when the last rank runs out
    assert r0["limited"] == ["r0b0", "r0b1", "r0b2", None] and len(r1["limited"]) == 4
    assert r0["summed"] == r1["summed"] == [3.0, 20.0]
    assert r0["input_kept"] == [1.0, 10.0]  # the caller's tensor is not reduced in place
    assert r0["table"] == r1["table"] == [[0.0, 7.0], [1.0, 7.0]]
    assert r0["shared"] == r1["shared"] == [5.0]
    assert (r0["min"], r0["max"], r0["sum"]) == (3, 4, 7) == (r1["min"], r1["max"], r1["sum"])


def _gather_rows_worker(rank: int, world_size: int, out_dir: str) -> None:
    from mgmoe_ds.train.distributed import Collectives

    comm = Collectives(torch.device("cpu"))
    mine = torch.arange(6.0).view(3, 2) if rank == 0 else torch.tensor([[-1.0, -2.0]])  # 3 rows, 1 row
    ids = torch.tensor([[7], [8]]) if rank == 0 else torch.zeros(0, 1, dtype=torch.long)  # 2 rows, none
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "rows": comm.all_gather_rows(mine).tolist(), "ids": comm.all_gather_rows(ids).tolist(),
        "kept": mine.tolist(),
    }))


@pytest.mark.slow
def test_all_gather_rows_concatenates_every_ranks_rows_in_rank_order_whatever_their_count(tmp_path):
    run_ranks(_gather_rows_worker, 2, str(tmp_path), timeout=120)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["rows"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [-1.0, -2.0]]  # no padding row left
        assert result["ids"] == [[7], [8]]  # a rank with no row adds none
    assert json.loads((tmp_path / "rank1.json").read_text())["kept"] == [[-1.0, -2.0]]


def test_a_world_the_expert_parallel_size_does_not_divide_is_refused_in_one_line():
    check_expert_parallel_size(2, 4, 6, "ds.json")  # fits: no error
    with pytest.raises(WorldError) as error:
        check_expert_parallel_size(4, 4, 2, "ds.json")
    assert str(error.value).startswith("ds.json: mgmoe.moe.expert_parallel_size = 4 does not divide the number "
                                       "of ranks (2)") and "\n" not in str(error.value)
    with pytest.raises(WorldError, match=r"expected a divisor of the number of experts \(4\)"):
        check_expert_parallel_size(3, 4, 6, "ds.json")


def test_which_deepspeed_settings_reduce_in_arrival_order():
    assert reduces_in_arrival_order({"zero_optimization": {"stage": 2}})
    assert reduces_in_arrival_order({"zero_optimization": {"stage": 1, "overlap_comm": True}})
    assert not reduces_in_arrival_order({"zero_optimization": {"stage": 1}})
    assert not reduces_in_arrival_order({})


class _TwoPaths(nn.Module):
    """``a`` is reached late in backward when ``late`` is set, early otherwise (as an expert's
    parameters are when it ran on rows, or only through its zero term); ``unused`` is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.b = nn.Parameter(torch.tensor([0.5, 3.0]))
        self.unused = nn.Parameter(torch.tensor([4.0]))

    def forward(self, x: torch.Tensor, late: bool) -> torch.Tensor:
        if late:
            return ((x * self.a).exp() * self.b).sum()
        return (x * self.b).sum() ** 2 + (self.a ** 3).sum()


@pytest.mark.parametrize("late", [True, False])
@pytest.mark.parametrize("loss_scale", [1.0, 1024.0])
def test_fixed_order_loss_gives_each_parameter_its_gradient_in_one_order(late, loss_scale):
    x = torch.tensor([0.3, -0.7])
    model = _TwoPaths()
    # the reference: a plain backward, then the same formulas by hand
    model(x, late).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    a, b = model.a.detach(), model.b.detach()
    if late:
        by_hand = {"a": x * (x * a).exp() * b, "b": (x * a).exp()}
    else:
        by_hand = {"a": 3 * a ** 2, "b": 2 * (x * b).sum() * x}
    for name in ("a", "b"):
        torch.testing.assert_close(plain[name], by_hand[name])

    model.zero_grad(set_to_none=True)
    arrivals: list[str] = []
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: arrivals.append(name))
    ordered = [model.a, model.unused, model.b]
    surrogate = fixed_order_loss(model(x, late), ordered, loss_scale)
    (surrogate * loss_scale).backward()  # what DeepSpeed does with an fp16 loss scale
    assert arrivals == ["b", "unused", "a"]  # the reverse of ``ordered``, whatever path reached ``a``
    for name in ("a", "b"):
        torch.testing.assert_close(model.get_parameter(name).grad / loss_scale, by_hand[name])
    assert torch.equal(model.unused.grad, torch.zeros(1))  # unused: a zero gradient, so its hook still fires


@dataclass
class _Output:
    """A dataclass, as ``ModelOutput`` is: DeepSpeed hooks tensors (and tuples, lists, dicts of
    them) that a forward returns, and those hooks must not fire inside ``fixed_order_loss``."""

    loss: torch.Tensor


class _RankDependentOrder(nn.Module):
    """Rank 0 reaches ``a`` last in backward, rank 1 reaches it first (as a routed expert is
    reached late where it ran and early where only its zero term touched it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.arange(1.0, 7.0) / 10)  # 6 elements
        self.b = nn.Parameter(torch.arange(1.0, 5.0) / 10)  # 4: ZeRO-2 splits the 10 into 5 + 5

    def forward(self, x: torch.Tensor, rank: int) -> _Output:
        if rank == 0:
            return _Output(((x[:6] * self.a).sum() * self.b).sum())
        return _Output((self.b * x[:4]).sum() ** 2 + (self.a ** 2).sum())  # ``a`` made last: reached first


def _zero2_order_worker(rank: int, world_size: int, out_dir: str, fixed: bool) -> None:
    import deepspeed

    model = _RankDependentOrder()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "steps_per_print": 10**6,
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}  # SGD: the update is the mean gradient
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x = torch.arange(1.0, 7.0)
    loss = engine(x, rank).loss
    if fixed:
        loss = fixed_order_loss(loss, [model.a, model.b])
    engine.backward(loss)
    engine.step()
    torch.save({"a": model.a.detach().clone(), "b": model.b.detach().clone()}, Path(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_zero2_averages_the_gradients_of_ranks_that_reach_parameters_in_different_orders(tmp_path):
    run_ranks(_zero2_order_worker, 2, str(tmp_path), True, timeout=120)
    a0, b0 = torch.arange(1.0, 7.0) / 10, torch.arange(1.0, 5.0) / 10
    x = torch.arange(1.0, 7.0)
    # by hand: rank 0's loss s * sum(b) with s = <x, a>; rank 1's |a|^2 + <b, x[:4]>^2
    s = float((x * a0).sum())
    grad_rank0 = {"a": x * float(b0.sum()), "b": torch.full((4,), s)}
    grad_rank1 = {"a": 2 * a0, "b": 2 * float((b0 * x[:4]).sum()) * x[:4]}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, start in (("a", a0), ("b", b0)):
            expected = start - (grad_rank0[name] + grad_rank1[name]) / 2  # SGD, lr 1, the average gradient
            torch.testing.assert_close(got[name], expected, msg=f"rank {rank}: {name}")
