"""Distributed set-up and every collective the trainer issues, on the rank's own device.

NCCL reduces only tensors on the rank's GPU, gloo those on the CPU: every collective here moves
its tensor to ``Collectives.device`` first and hands the result back where the caller keeps it.
There is no world-size-1 shortcut: a one-rank run (one GPU, or ``python jobs/train.py``) makes
the same calls a cluster does, so a collective that would fail at eight ranks fails at one.

Loop counts that every rank must agree on (steps of an epoch, batches of an evaluation pass)
come from :meth:`Collectives.agreed`: a vote per batch on batches that exist, never from
``len()`` alone, so a rank whose loader yields fewer batches than planned (corrupt samples
skipped, re-balanced classes, uneven shards) neither crashes nor leaves the others waiting.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

LOG = logging.getLogger("mgmoe")
PORT_ATTEMPTS = 5  # a world of one retries its store on another free port this many times in all

T = TypeVar("T")


class WorldError(ValueError):
    """The launch does not fit the configuration (said in one line, on every rank, before any collective)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    accelerator: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """The number of ranks the launcher started (1 without a launcher), read before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


SHM_ALLREDUCE_PREFIX = "deepspeed_allreduce_buffer"  # DeepSpeed's CPU shared-memory all-reduce (csrc/cpu/comm/shm.cpp)


def shared_memory_name(rank: int) -> Path:
    """The ``/dev/shm`` segment DeepSpeed's CPU all-reduce creates for ``rank`` of this launch."""
    return Path("/dev/shm") / (f"{SHM_ALLREDUCE_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shared_memory_names(rank: int) -> None:
    """Removes this rank's name of DeepSpeed's shared-memory all-reduce segment, once every rank has
    mapped every segment (a barrier after ``init_distributed``, which maps them).

    On CPU with all ranks on one machine, DeepSpeed creates one ~69 MB ``/dev/shm`` segment per rank
    and never unlinks it: every run left its segments in RAM until reboot (20 GB after a day of
    runs here, and the next job was killed for memory). Unlinking a name keeps the mappings valid
    until the processes exit, so the run is unchanged and even a killed run leaves nothing behind.
    """
    dist.barrier()  # every rank has mapped every segment (init_distributed waits for its peers')
    shared_memory_name(rank).unlink(missing_ok=True)  # absent off CPU or across machines


def teardown_distributed(comm: "Collectives") -> None:
    """After a run that ended well on every rank: one barrier, then every process group goes, so no
    backend thread outlives the interpreter (NCCL warns and can hang at exit; gloo can abort)."""
    comm.barrier()
    dist.destroy_process_group()


def check_expert_parallel_size(expert_parallel_size: int, num_experts: int, world_size: int, source: str) -> None:
    """Refuses a launch whose world the expert-parallel size does not divide.

    Called on every rank before the process group exists, so each rank fails in one line and
    none is left waiting in a collective.

    Raises:
        WorldError: naming the config file, the key, the value and what is accepted.
    """
    if num_experts % expert_parallel_size:
        raise WorldError(f"{source}: mgmoe.moe.expert_parallel_size = {expert_parallel_size}: expected a divisor "
                         f"of the number of experts ({num_experts})")
    if world_size % expert_parallel_size:
        raise WorldError(f"{source}: mgmoe.moe.expert_parallel_size = {expert_parallel_size} does not divide the "
                         f"number of ranks ({world_size}); launch a multiple of {expert_parallel_size} ranks or "
                         f"set it to a divisor of {world_size}")


def setup_distributed() -> DistInfo:
    """Initialises DeepSpeed's process group (one process without a launcher works too)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    own_port = "RANK" not in os.environ  # plain `python jobs/train.py`: a world of one
    for attempt in range(PORT_ATTEMPTS):
        if own_port:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        try:
            deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)
            break
        except dist.DistNetworkError:
            # The port we found free was taken before the store bound it (another job
            # starting on this machine): draw another one.
            if not own_port or attempt == PORT_ATTEMPTS - 1:
                raise
    rank, world = dist.get_rank(), dist.get_world_size()
    release_shared_memory_names(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    name = accelerator.device_name()
    if name == "cpu":
        device = torch.device("cpu")
        if rank == 0:
            LOG.info("no GPU found: running on DeepSpeed's CPU accelerator with %s (%d rank(s))",
                     accelerator.communication_backend_name(), world)
    else:
        accelerator.set_device(local_rank)
        device = torch.device(name, local_rank)
    return DistInfo(rank, world, local_rank, device, name)


_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class Collectives:
    """The few collectives the trainer uses, over the whole world, on ``device``.

    Args:
        device: the rank's device (``cuda:<local rank>`` under NCCL, ``cpu`` under gloo).
        group: the process group; None for the default (whole) world.
    """

    def __init__(self, device: torch.device, group: Any = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Collectives need an initialised process group (setup_distributed)")
        self.device = torch.device(device)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _reduced(self, t: Tensor, op: str) -> Tensor:
        on_device = t.detach().to(self.device, copy=True)  # a copy: the caller's tensor is never changed
        dist.all_reduce(on_device, op=_OPS[op], group=self.group)
        return on_device

    def sum(self, t: Tensor) -> Tensor:
        """Elementwise sum over ranks, returned on ``t``'s device (``t`` itself is left as it was)."""
        return self._reduced(t, "sum").to(t.device)

    def reduce_int(self, value: int, op: str) -> int:
        """``op`` ("sum", "min" or "max") of one integer over ranks."""
        return int(self._reduced(torch.tensor([int(value)], dtype=torch.int64), op).item())

    def per_rank(self, values: Iterable[float]) -> Tensor:
        """Every rank's values side by side: (world_size, V) float64 on the CPU, row r from rank r."""
        row = torch.tensor(list(values), dtype=torch.float64)  # (V,)
        table = torch.zeros(self.world_size, row.numel(), dtype=torch.float64)  # (P, V)
        table[self.rank] = row
        return self.sum(table)

    def all_gather_rows(self, t: Tensor) -> Tensor:
        """Every rank's rows of ``t``, in rank order, on ``t``'s device: (N_0 + ... + N_{P-1}, ...) from
        each rank's (N_r, ...); the row counts may differ, the other dimensions and the dtype may not."""
        local = t.detach().to(self.device)
        counts = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.int64, device=self.device),
                        group=self.group)
        rows = [int(c) for c in counts]  # (P,) each rank's N_r
        # (max N_r, ...): all_gather takes equal sizes; at least one row, so no rank sends an empty tensor
        padded = local.new_zeros((max(1, *rows), *local.shape[1:]))
        padded[:local.shape[0]] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([part[:n] for part, n in zip(gathered, rows)]).to(t.device)  # (sum N_r, ...)

    def union(self, names: Iterable[str]) -> list[str]:
        """The sorted union of every rank's ``names`` (ranks holding different experts log different losses)."""
        gathered: list[Optional[list[str]]] = [None] * self.world_size
        dist.all_gather_object(gathered, sorted(set(names)), group=self.group)
        return sorted(set().union(*gathered))

    def broadcast_from_main(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` on every rank (same shape and dtype everywhere), on ``t``'s device."""
        on_device = t.detach().to(self.device, copy=True)
        dist.broadcast(on_device, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                       group=self.group)
        return on_device.to(t.device)

    def barrier(self) -> None:
        """Every rank waits for the others (an all-reduce on the device, the same call under any backend)."""
        self._reduced(torch.zeros(1), "sum")

    def agreed(self, batches: Iterable[T], *, pad: bool, limit: Optional[int] = None) -> "AgreedBatches[T]":
        """This rank's batches, the same count on every rank: see :class:`AgreedBatches`."""
        return AgreedBatches(self, batches, pad=pad, limit=limit)


class AgreedBatches(Generic[T]):
    """Batches with the same count on every rank, decided per batch by a vote on batches that exist.

    Args:
        collectives: the world that votes.
        batches: this rank's batches (any iterable; it may yield fewer than its ``len()``).
        pad: False (training): stop as soon as any rank has no batch left. True (evaluation): go
            on while any rank has one; a rank that ran out gets None (the caller runs an empty
            batch so that expert-parallel collectives still match).
        limit: at most this many batches (the same on every rank), or None.

    After a pass, ``steps`` is the number of batches every rank went through and ``ran_out``
    whether this rank's own batches ended the pass (False: another rank, or ``limit``, did).
    """

    def __init__(self, collectives: Collectives, batches: Iterable[T], *, pad: bool, limit: Optional[int] = None):
        self.collectives, self.batches, self.pad, self.limit = collectives, batches, pad, limit
        self.steps = 0
        self.ran_out = False

    def __iter__(self) -> Iterator[Optional[T]]:
        iterator = iter(self.batches)
        while self.limit is None or self.steps < self.limit:
            batch = next(iterator, None)
            self.ran_out = self.ran_out or batch is None
            if not self.collectives.reduce_int(int(batch is not None), "max" if self.pad else "min"):
                return
            self.steps += 1
            yield batch


def adjust_precision(ds_config: dict[str, Any], rank: int) -> dict[str, Any]:
    """Turns off fp16/bf16 settings the device cannot honour, with one logged line each."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp16": accelerator.is_fp16_supported(), "bf16": accelerator.is_bf16_supported(),
                 "torch_autocast": accelerator.is_bf16_supported()}
    if accelerator.device_name() == "cpu":
        # CPU training here is fp32: low-precision kernels on CPU are slower, not faster.
        supported = {"fp16": False, "bf16": False, "torch_autocast": False}
    for key, ok in supported.items():
        section = ds_config.get(key)
        if isinstance(section, dict) and section.get("enabled") and not ok:
            ds_config[key] = dict(section, enabled=False)
            if rank == 0:
                LOG.warning("%s is enabled in the DeepSpeed config but %s cannot honour it: turned off",
                            key, accelerator.device_name())
    return ds_config


def reduces_in_arrival_order(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed reduces gradients in hooks, in the order they arrive during backward.

    ZeRO-2 (and ZeRO-1 with ``overlap_comm``) copies each gradient into a bucket as it arrives
    and reduces the bucket's slices in that order: every rank must produce its gradients in the
    same order, or slices of different tensors are summed together, silently.
    """
    zero = ds_config.get("zero_optimization", {}) or {}
    return int(zero.get("stage", 0)) >= 2 or bool(zero.get("overlap_comm", False))


def fixed_order_loss(loss: Tensor, params: list[torch.nn.Parameter], loss_scale: float = 1.0,
                     anchors: Sequence[Tensor] = ()) -> Tensor:
    """A loss with ``loss``'s gradient whose backward reaches ``params`` in a fixed order: the reverse of ``params``.

    With routed experts the order in which backward reaches each parameter depends on the data:
    an expert that got no rows on a rank is reached through its zero term, elsewhere than on a
    rank where it ran; a fallback head that answered a dropped image sits elsewhere in the graph
    than one that did not. DeepSpeed's in-hook reduction (:func:`reduces_in_arrival_order`) then
    sums unrelated slices across ranks. So the real backward runs first, as ``autograd.grad``
    (no hook fires), and the gradients are handed to DeepSpeed through a surrogate
    ``sum_i <p_i, g_i>`` whose own backward gives each ``p_i`` exactly ``g_i``, in an order that
    is the same on every rank. The price: the gradient reduction no longer overlaps the backward.

    ``loss`` must not come from tensors an engine's forward returned bare (or in a tuple, list or
    dict): DeepSpeed hooks those, and its hooks would start its backward epilogue inside
    ``autograd.grad``. The model returns a dataclass (``ModelOutput``), which it leaves alone.

    Args:
        loss: the scalar to differentiate (it may run collectives in backward: they run here,
            in ``autograd.grad``, identically on every rank).
        params: every trainable parameter, in the order their gradients should arrive reversed
            (put the parameters every rank holds last, so their slices come first in each bucket).
        loss_scale: the fp16 loss scale DeepSpeed will apply to the surrogate (1 otherwise); the
            real backward runs on ``loss * loss_scale`` so small gradients do not underflow.
        anchors: the routed layers' exchange anchors (``MoEOutput.exchange_anchor``). They are
            differentiated too (and their gradients dropped): ``autograd.grad`` runs only the
            nodes that lead to its inputs, so without them a rank whose experts got no rows, on a
            frozen payload, would skip the all-to-all backward that the other ranks run, and hang.

    Returns:
        The surrogate: pass it to ``engine.backward`` in place of ``loss``.
    """
    inputs = [*params, *anchors]
    grads = torch.autograd.grad(loss * loss_scale if loss_scale != 1.0 else loss, inputs,
                                allow_unused=True)[:len(params)]
    surrogate = loss.detach().float() * 0.0
    for param, grad in zip(params, grads):
        if grad is None:  # not used this step: a zero gradient keeps the hook sequence the same on every rank
            grad = torch.zeros_like(param)
        if loss_scale != 1.0:  # in fp32, so the unscaled gradient does not underflow before DeepSpeed rescales it
            surrogate = surrogate + (param.float() * (grad.float() / loss_scale)).sum()
        else:
            surrogate = surrogate + (param * grad).sum().float()
    return surrogate


def build_engine(model: torch.nn.Module, groups: list[dict[str, Any]], ds_config: dict[str, Any], total_steps: int):
    """A DeepSpeed engine over ``groups`` (dicts with a unique ``name``, ``params``, ``lr`` and options).

    The learning rate warms up linearly over the first tenth of the steps (at most 100), then
    follows a cosine down to 5% of each group's lr.
    """
    import deepspeed

    from mgmoe_ds.moe.deepspeed_compat import moe_param_groups

    warmup = max(1, min(100, total_steps // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    engine, *_ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(groups), config=ds_config,
                                      lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine


def fixed_order(engine: Any, params: list[torch.nn.Parameter]) -> Callable[..., Tensor]:
    """``(loss, anchors) -> fixed_order_loss(loss, params, <the engine's fp16 loss scale, 1 in fp32
    and bf16>, anchors)``."""

    def reorder(loss: Tensor, anchors: Sequence[Tensor] = ()) -> Tensor:
        scale = float(getattr(engine.optimizer, "loss_scale", 1.0)) if engine.fp16_enabled() else 1.0
        return fixed_order_loss(loss, params, scale, anchors)

    return reorder


def gradient_order(model: torch.nn.Module, expert_params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Every trainable parameter for :func:`fixed_order_loss`: the experts' first and the parameters
    every rank holds last, so that theirs arrive first, in the same order on every rank."""
    expert_ids = {id(p) for p in expert_params}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [p for p in trainable if id(p) in expert_ids] + [p for p in trainable if id(p) not in expert_ids]
