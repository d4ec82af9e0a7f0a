"""Engine benchmark (issue 2): ``RoutedExperts`` vs ``deepspeed.moe.layer.MoE`` on CPU or one GPU.

Homogeneous MLP experts (512 -> 2048 -> 512, GELU, fp32 or bf16), E = 8, K = 2, capacity factor
1.25, min_capacity 4, forward + backward in a single process (world size 1), tokens 2k..32k.

Every (variant, tokens) point runs in its own subprocess so that memory numbers do not leak
between points. In the worker:

* the layer and a fixed input/upstream-gradient are built, then ``--warmup`` untimed
  forward+backward steps run on min(T, 2048) tokens (allocates parameter gradients, lazy init);
* each timed step: read VmRSS, reset the peak-RSS counter (``echo 5 > /proc/self/clear_refs``,
  which also resets ``ru_maxrss``), run forward + backward, read VmHWM; the step's peak memory is
  ``VmHWM - VmRSS(before)`` = the transient working set of one step (activations saved for
  backward, dispatch buffers, gradient temporaries) on top of the model, its gradients and input.
* glibc is run with ``MALLOC_MMAP_THRESHOLD_=131072`` (set for both variants) so that every
  buffer >= 128 KiB is its own mmap and returned to the OS on free; RSS then follows live bytes.

With ``--device cuda`` (one GPU, ``cuda:0``) the layers, input and upstream gradient live on the
GPU; ``--warmup`` (default 3) steps run at the full size T; each timed step is bracketed by
``torch.cuda.synchronize()`` and the table gives the median wall time of ``--repeats`` (default 20)
steps. The step's peak memory is ``torch.cuda.max_memory_allocated()`` after
``torch.cuda.reset_peak_memory_stats()``, minus ``torch.cuda.memory_allocated()`` before the step:
the same transient working set, counted by PyTorch's caching allocator (bytes handed to tensors,
not the allocator's reserved pool). DeepSpeed's process group then uses the accelerator's backend
(NCCL). ``--dtype bf16`` casts both layers, the input and the upstream gradient to bfloat16 (both
routers still compute their gate in fp32).

Usage::

    PYTHONPATH=. python bench/bench_moe_layer.py                      # CPU, fp32 (~8 min on 2 cores)
    PYTHONPATH=. python bench/bench_moe_layer.py --sizes 2048 --repeats 2   # smoke
    PYTHONPATH=. python bench/bench_moe_layer.py --threads 1 --sizes 8192 --out bench/results/moe_layer_1thread.json
    PYTHONPATH=. python bench/bench_moe_layer.py --device cuda        # one GPU, fp32
    PYTHONPATH=. python bench/bench_moe_layer.py --device cuda --dtype bf16

Writes raw results to ``bench/results/moe_layer.json`` (CPU fp32) or
``bench/results/moe_layer_<device>[_bf16].json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from machine import cpu_name

HIDDEN = 512
FFN = 2048
NUM_EXPERTS = 8
TOP_K = 2
CAPACITY_FACTOR = 1.25
MIN_CAPACITY = 4
SEED = 1234
SIZES = (2048, 4096, 8192, 16384, 32768)
REPEATS = {2048: 5, 4096: 3, 8192: 3, 16384: 2, 32768: 2}
PAIRED_TOKENS = 8192
PAIRED_REPEATS = 5
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype -> torch dtype name
CUDA_REPEATS = 20  # GPU steps take milliseconds: many repeats for a stable median
CUDA_WARMUP = 3


def results_path(device: str, dtype: str, shift: float = 0.0) -> Path:
    """CPU fp32 keeps the historical name ``moe_layer.json``; every other run names its device/dtype
    (and its input shift, when the router is skewed)."""
    skew = f"_shift{shift:g}" if shift else ""
    if device == "cpu" and dtype == "fp32":
        return RESULTS_DIR / f"moe_layer{skew}.json"
    return RESULTS_DIR / f"moe_layer_{device}{'_bf16' if dtype == 'bf16' else ''}{skew}.json"


def _torch_dtype(dtype: str):
    import torch
    return getattr(torch, DTYPES[dtype])


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _inputs(tokens: int, device: str, dtype: str, shift: float = 0.0):
    """The fixed input (requires grad) and upstream gradient, drawn on the CPU so every device sees the same.

    ``shift`` is added to every input feature: the router's logits then gain a per-expert offset
    (``shift`` x the sum of that expert's router weights), so the load is skewed and the busiest
    experts overflow their capacity, as in early training.
    """
    import torch
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, HIDDEN, generator=g) + shift
    gy = torch.randn(tokens, HIDDEN, generator=g)
    kind = _torch_dtype(dtype)
    return x.to(device=device, dtype=kind).requires_grad_(True), gy.to(device=device, dtype=kind)


# ----------------------------------------------------------------------------------------------
# Models (imported lazily inside the worker so the parent stays light)


def _mlp():
    from torch import nn
    return nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))


def _seeded_mlp(index: int):
    import torch
    torch.manual_seed(SEED + 1 + index)
    return _mlp()


def _router_weight():
    import torch
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(NUM_EXPERTS, HIDDEN, generator=g) * 0.02


def build_ours(device: str = "cpu", dtype: str = "fp32"):
    import torch
    from torch import nn

    from mgmoe_ds.moe.layer import RoutedExperts

    @dataclass
    class Out:
        logits: torch.Tensor
        aux_losses: dict = field(default_factory=dict)

    class MLPExpert(nn.Module):
        """Reads payload["x"] (n, 512); returns (n, 512) in ``.logits``."""

        def __init__(self, index: int) -> None:
            super().__init__()
            self.net = _seeded_mlp(index)

        def forward(self, payload, targets, segments=None):
            return Out(self.net(payload["x"]))

    torch.manual_seed(SEED - 1)
    layer = RoutedExperts(
        [lambda i=i: MLPExpert(i) for i in range(NUM_EXPERTS)],
        router_dim=HIDDEN,
        output_shape=(HIDDEN,),
        top_k=TOP_K,
        capacity_factor=CAPACITY_FACTOR,
        min_capacity=MIN_CAPACITY,
        fallback_head=nn.Linear(HIDDEN, HIDDEN),
    )
    with torch.no_grad():
        layer.router.gate.weight.copy_(_router_weight())
    layer.to(device=device, dtype=_torch_dtype(dtype))
    layer.train()

    def step(x, gy):
        out = layer(x, {"x": x})
        # DeepSpeed's MoE adds its l_aux; ours: the same GShard balance loss plus the router z-loss
        loss = (out.output * gy).sum() + 0.01 * out.aux_losses["load_balance"] + 0.001 * out.aux_losses["z_loss"]
        loss.backward()
        return out

    return layer, step


def init_deepspeed_single_process(device: str = "cpu") -> str:
    """World-size-1 process group: gloo on CPU, the accelerator's own backend (NCCL) on a GPU.

    Returns:
        The backend name.
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed
    backend = "gloo"
    if device == "cuda":
        import torch
        from deepspeed.accelerator import get_accelerator
        accelerator = get_accelerator()
        if accelerator.device_name() != "cuda":
            raise RuntimeError(f"--device cuda: DeepSpeed chose the {accelerator.device_name()!r} accelerator; "
                               "unset DS_ACCELERATOR or set DS_ACCELERATOR=cuda")
        torch.cuda.set_device(0)
        backend = accelerator.communication_backend_name()
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return backend


def build_deepspeed(device: str = "cpu", dtype: str = "fp32"):
    import torch
    from deepspeed.moe.layer import MoE

    init_deepspeed_single_process(device)
    layer = MoE(hidden_size=HIDDEN, expert=_mlp(), num_experts=NUM_EXPERTS, ep_size=1, k=TOP_K,
                capacity_factor=CAPACITY_FACTOR, min_capacity=MIN_CAPACITY,
                # Deterministic top-2 like ours (the default adds Gumbel noise to pick the 2nd expert).
                top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()  # creates the ep_size_1 expert group and binds it
    with torch.no_grad():
        for i, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            expert.load_state_dict(_seeded_mlp(i).state_dict())
        layer.deepspeed_moe.gate.wg.weight.copy_(_router_weight())
    layer.to(device=device, dtype=_torch_dtype(dtype))  # TopKGate computes its logits in fp32 itself
    layer.train()

    def step(x, gy):
        out, l_aux, _ = layer(x.unsqueeze(0))  # (1, T, M)
        loss = (out.squeeze(0) * gy).sum() + 0.01 * l_aux
        loss.backward()
        return out

    return layer, step


# ----------------------------------------------------------------------------------------------
# Worker


def _proc_status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024  # bytes
    return values


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _timed_step(step, x, gy, device: str) -> tuple[float, float, int]:
    """One forward+backward: (wall s, process CPU s, transient peak bytes of this step)."""
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        out = step(x, gy)
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        del out
        return wall, cpu, torch.cuda.max_memory_allocated() - before
    before = _proc_status()["VmRSS"]
    _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    out = step(x, gy)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del out
    return wall, cpu, _proc_status()["VmHWM"] - before


def worker(variant: str, tokens: int, repeats: int, warmup: int, device: str = "cpu", dtype: str = "fp32",
           shift: float = 0.0) -> dict:
    import torch

    torch.manual_seed(0)
    layer, step = build_ours(device, dtype) if variant == "ours" else build_deepspeed(device, dtype)
    x, gy = _inputs(tokens, device, dtype, shift)
    # CPU: warm up on a small batch (allocates parameter gradients, oneDNN/MKL init) to keep big
    # points cheap. GPU: at full size, so kernels, cuBLAS workspaces and the allocator's pool for
    # this shape are ready before timing.
    n_warm = tokens if device == "cuda" else min(tokens, 2048)
    x_warm = x[:n_warm].detach().clone().requires_grad_(True)
    for _ in range(warmup):
        step(x_warm, gy[:n_warm])
    del x_warm
    times, cpu_times, peaks = [], [], []
    for _ in range(repeats):
        layer.zero_grad(set_to_none=False)
        x.grad = None
        wall, cpu, peak = _timed_step(step, x, gy, device)
        times.append(wall)
        cpu_times.append(cpu)
        peaks.append(peak)
    return {
        "variant": variant,
        "device": device,
        "dtype": dtype,
        "warmup": warmup,
        "tokens": tokens,
        "repeats": repeats,
        "times_s": times,
        "median_s": statistics.median(times),
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "peak_bytes": peaks,
        "median_peak_bytes": statistics.median(peaks),
        "threads": torch.get_num_threads(),
    }


def paired(tokens: int, repeats: int, warmup: int = 1, device: str = "cpu", dtype: str = "fp32",
           shift: float = 0.0) -> dict:
    """Both layers in one process, steps interleaved ours/DS/DS/ours/...: the ratio sees the same load."""
    import torch

    ours, ours_step = build_ours(device, dtype)
    ds, ds_step = build_deepspeed(device, dtype)
    x, gy = _inputs(tokens, device, dtype, shift)
    n_warm = tokens if device == "cuda" else min(tokens, 2048)
    for _ in range(warmup):
        for fn in (ours_step, ds_step):
            fn(x[:n_warm].detach().clone().requires_grad_(True), gy[:n_warm])
    wall = {"ours": [], "deepspeed": []}
    cpu = {"ours": [], "deepspeed": []}
    for i in range(repeats):
        order = [("ours", ours, ours_step), ("deepspeed", ds, ds_step)]
        for name, layer, fn in (order if i % 2 == 0 else order[::-1]):
            layer.zero_grad(set_to_none=False)
            x.grad = None
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn(x, gy)
            _sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ratios = [a / b for a, b in zip(wall["ours"], wall["deepspeed"])]
    with torch.no_grad():
        route = ours(x, {"x": x}).route  # the rows ours ran through its experts at this point
    return {
        "tokens": tokens,
        "load_per_expert": route.load_per_expert.tolist(),
        "ours_expert_rows": int(route.kept.sum()),
        "deepspeed_expert_rows": NUM_EXPERTS * route.capacity,
        "repeats": repeats,
        "wall_s": wall,
        "cpu_s": cpu,
        "median_wall_s": {k: statistics.median(v) for k, v in wall.items()},
        "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "pairwise_wall_ratios": ratios,
        "median_pairwise_wall_ratio": statistics.median(ratios),
        "cpu_ratio_of_medians": statistics.median(cpu["ours"]) / statistics.median(cpu["deepspeed"]),
    }


def check_equivalence(tokens: int = 2048, device: str = "cpu", dtype: str = "fp32", shift: float = 0.0) -> dict:
    """Same weights, same input: outputs and expert weight gradients of the two layers agree on kept tokens."""
    import torch

    ours, ours_step = build_ours(device, dtype)
    ds, ds_step = build_deepspeed(device, dtype)
    x, gy = _inputs(tokens, device, dtype, shift)
    xa = x.detach().clone().requires_grad_(True)
    xb = x.detach().clone().requires_grad_(True)
    out_a = ours_step(xa, gy)
    out_b = ds_step(xb, gy).reshape(tokens, HIDDEN)
    routed = ~out_a.route.fully_dropped
    w_a = torch.cat([p.grad.flatten() for p in ours.local_experts.parameters()])
    w_b = torch.cat([p.grad.flatten() for p in ds.deepspeed_moe.experts.deepspeed_experts.parameters()])
    return {
        "tokens": tokens,
        "device": device,
        "dtype": dtype,
        "capacity": out_a.route.capacity,
        "load_per_expert": out_a.route.load_per_expert.tolist(),
        "assignments_dropped": int(out_a.route.dropped_per_expert.sum()),
        "tokens_fully_dropped": int(out_a.route.fully_dropped.sum()),
        "max_abs_diff_output_routed_tokens": float((out_a.output.float() - out_b.detach().float())[routed].abs().max()),
        "max_abs_diff_expert_weight_grads": float((w_a.float() - w_b.float()).abs().max()),
        "max_abs_expert_weight_grad": float(w_b.abs().max()),
    }


# ----------------------------------------------------------------------------------------------
# Driver


def _run_child(args: list[str], script: str = __file__) -> dict:
    """Runs ``script`` (this file, or a benchmark built on it) as a worker; returns its RESULT line."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {args} printed no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def dispatch_tensor_sizes(tokens: int, activation_bytes: int = 4) -> dict:
    """Analytic sizes (bytes) of routing/dispatch state at this batch size.

    Args:
        tokens: T.
        activation_bytes: bytes per activation element (4 for fp32, 2 for bf16).
    """
    import math
    capacity = max(MIN_CAPACITY, math.ceil(CAPACITY_FACTOR * tokens * TOP_K / NUM_EXPERTS))
    tec = tokens * NUM_EXPERTS * capacity
    assignments = tokens * TOP_K
    return {
        "capacity": capacity,
        # Classic GShard/DeepSpeed dense path: combine_weights (T,E,C) fp32 + dispatch_mask (T,E,C) bool.
        "dense_sec_bytes": tec * 4 + tec * 1,
        # DeepSpeed's padded expert buffer (E, C, M): dispatched input, also the expert output.
        "ds_ecm_buffer_bytes": NUM_EXPERTS * capacity * HIDDEN * activation_bytes,
        # Ours: plan index tensors (token, choice, expert) int64 per kept assignment + (A, M) rows.
        "ours_index_bytes": 3 * assignments * 8,
        "ours_rows_bytes": assignments * HIDDEN * activation_bytes,
    }


def mib(n: float) -> float:
    return n / 2**20


def method_text(results: dict) -> str:
    """One paragraph saying what was measured and how, printed above the table."""
    m, c = results["machine"], results["config"]
    if c["device"] == "cuda":
        where = f"GPU {m['gpu']} (torch {m['torch']}, CUDA {m['cuda']}, deepspeed {m['deepspeed']}, backend {m['dist_backend']})"
        how = (f"wall time of one forward+backward with torch.cuda.synchronize() before and after, median of "
               f"{c['repeats_note']} after {c['warmup']} warm-up steps at full size; peak = "
               "torch.cuda.max_memory_allocated() after reset_peak_memory_stats() minus memory_allocated() before the "
               "step (the step's transient bytes on top of the model, its gradients and the input)")
    else:
        where = (f"CPU {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads; torch {m['torch']}, "
                 f"deepspeed {m['deepspeed']}, backend {m['dist_backend']})")
        how = (f"wall and process CPU time of one forward+backward, median of {c['repeats_note']} after "
               f"{c['warmup']} warm-up step(s) on min(T, 2048) tokens; peak = VmHWM - VmRSS before the step "
               "(RSS, MALLOC_MMAP_THRESHOLD_=131072)")
    skew = (f"; inputs shifted by {c['input_shift']:g} (a skewed router: the busiest experts overflow capacity)"
            if c.get("input_shift") else "")
    return (f"Device: {where}; dtype {c['dtype']}{skew}; each (layer, T) point in a fresh subprocess.\n"
            f"Method: {how}.")


def render(results: dict) -> str:
    cuda = results["config"]["device"] == "cuda"
    unit, scale = ("ms", 1e3) if cuda else ("s", 1.0)
    peak = "peak (MiB, CUDA allocator)" if cuda else "peak (MiB, RSS)"
    header = (f"| tokens | capacity | ours fwd+bwd wall ({unit}) | DS fwd+bwd wall ({unit}) | wall ours/DS | "
              + ("" if cuda else "CPU-time ours/DS | ")
              + f"ours {peak} | DS {peak} | mem ours/DS | dense T*E*C (MiB, not allocated by DS 0.19.8) |")
    lines = [method_text(results), "", header, "|---:" * (9 if cuda else 10) + "|"]
    for row in results["points"]:
        lines.append(
            f"| {row['tokens']} | {row['capacity']} | {row['ours']['median_s'] * scale:.3f} | "
            f"{row['deepspeed']['median_s'] * scale:.3f} | {row['time_ratio']:.2f} | "
            + ("" if cuda else f"{row['cpu_time_ratio']:.2f} | ")
            + f"{mib(row['ours']['median_peak_bytes']):.0f} | {mib(row['deepspeed']['median_peak_bytes']):.0f} | "
            f"{row['mem_ratio']:.2f} | {mib(row['sizes']['dense_sec_bytes']):.0f} |")
    return "\n".join(lines)


def machine_info(device: str) -> dict:
    import deepspeed
    import torch
    cpu = cpu_name()
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "dist_backend": "gloo", "loadavg_start": os.getloadavg()}
    if device == "cuda":
        from deepspeed.accelerator import get_accelerator
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    dist_backend=get_accelerator().communication_backend_name(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["ours", "deepspeed"])
    parser.add_argument("--check", action="store_true", help="(internal) equivalence check worker")
    parser.add_argument("--paired", action="store_true", help="(internal) interleaved timing worker")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU (cuda:0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="bf16 casts both layers, the input and the upstream gradient")
    parser.add_argument("--paired-repeats", type=int, default=None,
                        help=f"pairs in the interleaved run (default {PAIRED_REPEATS} on CPU, {CUDA_REPEATS} on "
                             "cuda; 0 skips it)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=0,
                        help=f"timed steps per point (0: per-size default on CPU, {CUDA_REPEATS} on cuda)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps before timing (default 1 on CPU, {CUDA_WARMUP} on cuda)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for both layers (0: torch's default, one per core); on a shared "
                             "machine 1 thread makes the CPU-time ratio less sensitive to other processes")
    parser.add_argument("--input-shift", type=float, default=0.0,
                        help="added to every input feature: skews the router's load so that the busiest experts "
                             "overflow capacity (0: the balanced benchmark; 0.25 and 0.5 give a max/mean load of "
                             "about 1.5 and 2 at 8192 tokens)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/moe_layer.json on CPU fp32, else "
                             "moe_layer_<device>[_bf16].json)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    warmup = args.warmup if args.warmup is not None else (CUDA_WARMUP if cuda else 1)
    device_args = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
                   "--input-shift", str(args.input_shift)]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)  # this process and, through device_args, every child

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.tokens, args.repeats, warmup, args.device, args.dtype,
                                           args.input_shift)))
        return
    if args.check:
        print("RESULT " + json.dumps(check_equivalence(args.tokens, args.device, args.dtype, args.input_shift)))
        return
    if args.paired:
        print("RESULT " + json.dumps(paired(args.tokens, args.repeats, warmup, args.device, args.dtype,
                                           args.input_shift)))
        return

    import torch
    if cuda and not torch.cuda.is_available():
        sys.exit(f"bench_moe_layer.py: --device cuda: no CUDA GPU visible to torch {torch.__version__} "
                 f"(torch.cuda.is_available() is False); run it on a GPU machine or use --device cpu")
    out_path = args.out or results_path(args.device, args.dtype, args.input_shift)
    paired_repeats = args.paired_repeats if args.paired_repeats is not None else (CUDA_REPEATS if cuda else PAIRED_REPEATS)
    started = time.time()
    repeats_for = {t: args.repeats or (CUDA_REPEATS if cuda else REPEATS.get(t, 3)) for t in args.sizes}
    results = {
        "config": {"hidden": HIDDEN, "ffn": FFN, "experts": NUM_EXPERTS, "top_k": TOP_K,
                   "capacity_factor": CAPACITY_FACTOR, "min_capacity": MIN_CAPACITY, "dtype": DTYPES[args.dtype],
                   "device": args.device, "warmup": warmup, "input_shift": args.input_shift, "repeats": repeats_for,
                   "repeats_note": "/".join(str(repeats_for[t]) for t in args.sizes) + " timed steps"},
        "machine": machine_info(args.device),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "equivalence": _run_child(["--check", "--tokens", "2048", *device_args]),
        "points": [],
    }
    print("equivalence check:", json.dumps(results["equivalence"]), flush=True)
    activation_bytes = 2 if args.dtype == "bf16" else 4
    for tokens in args.sizes:
        row = {"tokens": tokens}
        # Alternate which variant goes first so slow phases of a shared machine hit both.
        order = ["ours", "deepspeed"] if (tokens.bit_length() % 2) else ["deepspeed", "ours"]
        for variant in order:
            row[variant] = _run_child(["--worker", variant, "--tokens", str(tokens), "--repeats",
                                       str(repeats_for[tokens]), "--warmup", str(warmup), *device_args])
            print(f"  {variant:9s} T={tokens:6d}: median {row[variant]['median_s']:.4f}s "
                  f"times {[round(t, 4) for t in row[variant]['times_s']]} "
                  f"peak {mib(row[variant]['median_peak_bytes']):.0f} MiB", flush=True)
        row["sizes"] = dispatch_tensor_sizes(tokens, activation_bytes)
        row["capacity"] = row["sizes"]["capacity"]
        row["time_ratio"] = row["ours"]["median_s"] / row["deepspeed"]["median_s"]
        row["cpu_time_ratio"] = row["ours"]["median_cpu_s"] / row["deepspeed"]["median_cpu_s"]
        row["mem_ratio"] = row["ours"]["median_peak_bytes"] / row["deepspeed"]["median_peak_bytes"]
        results["points"].append(row)
    if paired_repeats > 0:
        results["paired"] = _run_child(["--paired", "--tokens", str(PAIRED_TOKENS), "--repeats", str(paired_repeats),
                                        "--warmup", str(warmup), *device_args])
        pr = results["paired"]
        print(f"  paired T={PAIRED_TOKENS}: load per expert {pr['load_per_expert']}, expert rows ours "
              f"{pr['ours_expert_rows']} vs DS {pr['deepspeed_expert_rows']}", flush=True)
        print(f"  paired T={PAIRED_TOKENS}: ours {pr['median_wall_s']['ours']:.4f}s DS {pr['median_wall_s']['deepspeed']:.4f}s "
              f"median pairwise ratio {pr['median_pairwise_wall_ratio']:.2f} (cpu-time ratio {pr['cpu_ratio_of_medians']:.2f})",
              flush=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - started
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1))
    print()
    print(f"Command: {results['command']}")
    print(render(results))
    if "paired" in results:
        pr = results["paired"]
        paired_line = (f"\npaired interleaved T={PAIRED_TOKENS} x{pr['repeats']}: ours {pr['median_wall_s']['ours']:.4f}s, "
                       f"DS {pr['median_wall_s']['deepspeed']:.4f}s, median pairwise ratio "
                       f"{pr['median_pairwise_wall_ratio']:.2f}")
        # Host CPU time says nothing about GPU work.
        print(paired_line + ("" if cuda else f", CPU-time ratio {pr['cpu_ratio_of_medians']:.2f}"))
    print(f"\nwall {results['wall_s']:.0f}s; raw results in {out_path}")


if __name__ == "__main__":
    main()
