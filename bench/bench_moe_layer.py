"""Engine benchmark (issue 2): ``RoutedExperts`` vs ``deepspeed.moe.layer.MoE`` on CPU.

Homogeneous MLP experts (512 -> 2048 -> 512, GELU, fp32), E = 8, K = 2, capacity factor 1.25,
min_capacity 4, forward + backward in a single process, tokens 2k..32k.

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

Usage::

    PYTHONPATH=. /work/venv/bin/python bench/bench_moe_layer.py            # full run (~8 min on 2 cores)
    PYTHONPATH=. /work/venv/bin/python bench/bench_moe_layer.py --sizes 2048 --repeats 2   # smoke

Writes raw results to ``bench/results/moe_layer.json`` and prints a markdown table.
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
RESULTS = ROOT / "bench" / "results" / "moe_layer.json"


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


def build_ours():
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

        def forward(self, payload, targets):
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
    layer.train()

    def step(x, gy):
        out = layer(x, {"x": x})
        loss = (out.output * gy).sum() + out.aux_loss
        loss.backward()
        return out

    return layer, step


def init_deepspeed_single_process():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def build_deepspeed():
    import torch
    from deepspeed.moe.layer import MoE

    init_deepspeed_single_process()
    layer = MoE(hidden_size=HIDDEN, expert=_mlp(), num_experts=NUM_EXPERTS, ep_size=1, k=TOP_K,
                capacity_factor=CAPACITY_FACTOR, min_capacity=MIN_CAPACITY,
                # Deterministic top-2 like ours (the default adds Gumbel noise to pick the 2nd expert).
                top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()  # creates the ep_size_1 expert group and binds it
    with torch.no_grad():
        for i, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            expert.load_state_dict(_seeded_mlp(i).state_dict())
        layer.deepspeed_moe.gate.wg.weight.copy_(_router_weight())
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


def worker(variant: str, tokens: int, repeats: int, warmup: int) -> dict:
    import torch

    torch.manual_seed(0)
    layer, step = build_ours() if variant == "ours" else build_deepspeed()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, HIDDEN, generator=g).requires_grad_(True)
    gy = torch.randn(tokens, HIDDEN, generator=g)
    # Warm up on a small batch (allocates parameter gradients, oneDNN/MKL init) to keep big points cheap.
    n_warm = min(tokens, 2048)
    x_warm = x[:n_warm].detach().clone().requires_grad_(True)
    for _ in range(warmup):
        step(x_warm, gy[:n_warm])
    del x_warm
    times, cpu_times, peaks = [], [], []
    for _ in range(repeats):
        layer.zero_grad(set_to_none=False)
        x.grad = None
        before = _proc_status()["VmRSS"]
        _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        out = step(x, gy)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del out
        peaks.append(_proc_status()["VmHWM"] - before)
    return {
        "variant": variant,
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


def paired(tokens: int, repeats: int) -> dict:
    """Both layers in one process, steps interleaved ours/DS/DS/ours/...: the ratio sees the same load."""
    import torch

    ours, ours_step = build_ours()
    ds, ds_step = build_deepspeed()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, HIDDEN, generator=g).requires_grad_(True)
    gy = torch.randn(tokens, HIDDEN, generator=g)
    n_warm = min(tokens, 2048)
    for fn in (ours_step, ds_step):
        fn(x[:n_warm].detach().clone().requires_grad_(True), gy[:n_warm])
    wall = {"ours": [], "deepspeed": []}
    cpu = {"ours": [], "deepspeed": []}
    for i in range(repeats):
        order = [("ours", ours, ours_step), ("deepspeed", ds, ds_step)]
        for name, layer, fn in (order if i % 2 == 0 else order[::-1]):
            layer.zero_grad(set_to_none=False)
            x.grad = None
            t0, c0 = time.perf_counter(), time.process_time()
            fn(x, gy)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ratios = [a / b for a, b in zip(wall["ours"], wall["deepspeed"])]
    return {
        "tokens": tokens,
        "repeats": repeats,
        "wall_s": wall,
        "cpu_s": cpu,
        "median_wall_s": {k: statistics.median(v) for k, v in wall.items()},
        "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "pairwise_wall_ratios": ratios,
        "median_pairwise_wall_ratio": statistics.median(ratios),
        "cpu_ratio_of_medians": statistics.median(cpu["ours"]) / statistics.median(cpu["deepspeed"]),
    }


def check_equivalence(tokens: int = 2048) -> dict:
    """Same weights, same input: outputs and input gradients of the two layers agree on kept tokens."""
    import torch

    ours, ours_step = build_ours()
    ds, ds_step = build_deepspeed()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, HIDDEN, generator=g)
    gy = torch.randn(tokens, HIDDEN, generator=g)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    out_a = ours_step(xa, gy)
    out_b = ds_step(xb, gy).reshape(tokens, HIDDEN)
    routed = ~out_a.route.fully_dropped
    w_a = torch.cat([p.grad.flatten() for p in ours.local_experts.parameters()])
    w_b = torch.cat([p.grad.flatten() for p in ds.deepspeed_moe.experts.deepspeed_experts.parameters()])
    return {
        "tokens": tokens,
        "capacity": out_a.route.capacity,
        "assignments_dropped": int(out_a.route.dropped_per_expert.sum()),
        "tokens_fully_dropped": int(out_a.route.fully_dropped.sum()),
        "max_abs_diff_output_routed_tokens": float((out_a.output - out_b.detach())[routed].abs().max()),
        "max_abs_diff_expert_weight_grads": float((w_a - w_b).abs().max()),
        "max_abs_expert_weight_grad": float(w_b.abs().max()),
    }


# ----------------------------------------------------------------------------------------------
# Driver


def _run_child(args: list[str]) -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {args} printed no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def dispatch_tensor_sizes(tokens: int) -> dict:
    """Analytic sizes (bytes) of routing/dispatch state at this batch size (fp32 activations)."""
    import math
    capacity = max(MIN_CAPACITY, math.ceil(CAPACITY_FACTOR * tokens * TOP_K / NUM_EXPERTS))
    tec = tokens * NUM_EXPERTS * capacity
    assignments = tokens * TOP_K
    return {
        "capacity": capacity,
        # Classic GShard/DeepSpeed dense path: combine_weights (T,E,C) fp32 + dispatch_mask (T,E,C) bool.
        "dense_sec_bytes": tec * 4 + tec * 1,
        # DeepSpeed's padded expert buffer (E, C, M) fp32: dispatched input, also the expert output.
        "ds_ecm_buffer_bytes": NUM_EXPERTS * capacity * HIDDEN * 4,
        # Ours: plan index tensors (token, choice, expert) int64 per kept assignment + (A, M) rows.
        "ours_index_bytes": 3 * assignments * 8,
        "ours_rows_bytes": assignments * HIDDEN * 4,
    }


def mib(n: float) -> float:
    return n / 2**20


def render(results: dict) -> str:
    lines = ["| tokens | capacity | ours fwd+bwd wall (s) | DS fwd+bwd wall (s) | wall ours/DS | CPU-time ours/DS | "
             "ours peak (MiB) | DS peak (MiB) | mem ours/DS | dense T*E*C (MiB, not allocated by DS 0.19.8) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["points"]:
        lines.append(
            f"| {row['tokens']} | {row['capacity']} | {row['ours']['median_s']:.3f} | {row['deepspeed']['median_s']:.3f} | "
            f"{row['time_ratio']:.2f} | {row['cpu_time_ratio']:.2f} | {mib(row['ours']['median_peak_bytes']):.0f} | "
            f"{mib(row['deepspeed']['median_peak_bytes']):.0f} | {row['mem_ratio']:.2f} | "
            f"{mib(row['sizes']['dense_sec_bytes']):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["ours", "deepspeed"])
    parser.add_argument("--check", action="store_true", help="(internal) equivalence check worker")
    parser.add_argument("--paired", action="store_true", help="(internal) interleaved timing worker")
    parser.add_argument("--paired-repeats", type=int, default=PAIRED_REPEATS)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=0, help="timed steps per point (0: per-size default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.tokens, args.repeats, args.warmup)))
        return
    if args.check:
        print("RESULT " + json.dumps(check_equivalence(args.tokens)))
        return
    if args.paired:
        print("RESULT " + json.dumps(paired(args.tokens, args.repeats)))
        return

    import torch
    import deepspeed
    started = time.time()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    results = {
        "config": {"hidden": HIDDEN, "ffn": FFN, "experts": NUM_EXPERTS, "top_k": TOP_K,
                   "capacity_factor": CAPACITY_FACTOR, "min_capacity": MIN_CAPACITY, "dtype": "float32"},
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                    "loadavg_start": os.getloadavg()},
        "equivalence": _run_child(["--check", "--tokens", "2048"]),
        "points": [],
    }
    print("equivalence check:", json.dumps(results["equivalence"]), flush=True)
    for tokens in args.sizes:
        repeats = args.repeats or REPEATS.get(tokens, 3)
        row = {"tokens": tokens}
        # Alternate which variant goes first so slow phases of a shared machine hit both.
        order = ["ours", "deepspeed"] if (tokens.bit_length() % 2) else ["deepspeed", "ours"]
        for variant in order:
            row[variant] = _run_child(["--worker", variant, "--tokens", str(tokens), "--repeats", str(repeats),
                                       "--warmup", str(args.warmup)])
            print(f"  {variant:9s} T={tokens:6d}: median {row[variant]['median_s']:.3f}s "
                  f"times {[round(t, 3) for t in row[variant]['times_s']]} "
                  f"peak {mib(row[variant]['median_peak_bytes']):.0f} MiB", flush=True)
        row["sizes"] = dispatch_tensor_sizes(tokens)
        row["capacity"] = row["sizes"]["capacity"]
        row["time_ratio"] = row["ours"]["median_s"] / row["deepspeed"]["median_s"]
        row["cpu_time_ratio"] = row["ours"]["median_cpu_s"] / row["deepspeed"]["median_cpu_s"]
        row["mem_ratio"] = row["ours"]["median_peak_bytes"] / row["deepspeed"]["median_peak_bytes"]
        results["points"].append(row)
    if args.paired_repeats > 0:
        results["paired"] = _run_child(["--paired", "--tokens", str(PAIRED_TOKENS), "--repeats", str(args.paired_repeats)])
        pr = results["paired"]
        print(f"  paired T={PAIRED_TOKENS}: ours {pr['median_wall_s']['ours']:.3f}s DS {pr['median_wall_s']['deepspeed']:.3f}s "
              f"median pairwise ratio {pr['median_pairwise_wall_ratio']:.2f} (cpu-time ratio {pr['cpu_ratio_of_medians']:.2f})",
              flush=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print()
    print(render(results))
    if "paired" in results:
        pr = results["paired"]
        print(f"\npaired interleaved T={PAIRED_TOKENS} x{pr['repeats']}: ours {pr['median_wall_s']['ours']:.3f}s, "
              f"DS {pr['median_wall_s']['deepspeed']:.3f}s, median pairwise ratio {pr['median_pairwise_wall_ratio']:.2f}, "
              f"CPU-time ratio {pr['cpu_ratio_of_medians']:.2f}")
    print(f"\nwall {results['wall_s']:.0f}s; raw results in {args.out}")


if __name__ == "__main__":
    main()
