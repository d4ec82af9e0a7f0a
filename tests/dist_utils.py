"""Runs a function on N real CPU ranks (gloo) in spawned processes, for multi-rank tests."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, errors: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import deepspeed
        import torch

        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        fn(rank, world_size, *args)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # no gloo thread left to abort the exit
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300) -> None:
    """Starts ``world_size`` processes running ``fn(rank, world_size, *args)``; re-raises failures."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    if hung:
        messages.append(f"ranks {hung} did not finish in {timeout}s (hang)")
    bad = [i for i, p in enumerate(procs) if p.exitcode not in (0, None)]
    if messages or bad:
        raise AssertionError(f"multi-rank run failed (exit codes {[p.exitcode for p in procs]}):\n" + "\n".join(messages))
