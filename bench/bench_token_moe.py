"""Issue 16 benchmark: the token-level MoE layer (``BatchedRoutedExperts``) vs ``deepspeed.moe.layer.MoE``.

Both sides run the same homogeneous experts, an MLP ``d -> 4d -> d`` with GELU (d = 256 on the
CPU, 1024 on a GPU by default; ``--hidden``), with the same router weights (E, d) and the same
expert weights copied into each: E = 8, 32, 64 experts, K = 2, 16,384 tokens, forward + backward
(an upstream gradient on the output plus the balancing loss) in a single process, world size 1:

* ours: ``BatchedRoutedExperts(E, (d, 4d, d), router_dim=d, top_k=2, capacity_factor=cf,
  min_capacity=4)``: index dispatch (rows sorted by expert), the experts as stacked weights run
  by ``BatchedExperts``: a ``baddbmm`` per layer on rows padded to the busiest expert's kept
  count ("padded", every device), or ``torch._grouped_mm`` on exactly the kept rows ("grouped",
  chosen by ``backend="auto"`` on a CUDA GPU in bf16);
* DeepSpeed: ``MoE(hidden_size=d, expert=Sequential(fc1, GELU, fc2), num_experts=E, ep_size=1,
  k=2, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=4, drop_tokens=True,
  top2_2nd_expert_sampling=False)`` (deterministic second choice, like ours): ``top2gating``
  then the index dispatch of DeepSpeed 0.19.8 (``_sparse_encode``: a padded (E, C, d) buffer,
  no dense T x E x C tensors) and a Python loop of E ``nn.Sequential`` experts, each on its C
  rows.

The capacity rule at K = 2, read in ``deepspeed/moe/sharded_moe.py``: ``top2gating`` calls
``_capacity(gates, capacity_factor * 2, min_capacity)``, i.e. C = max(min_capacity,
ceil(T / E * 2 * cf)); DeepSpeed doubles the factor for Top-2. Ours
(``dispatch.expert_capacity``) is C = max(min_capacity, ceil(cf * T * K / E)), the same number
at K = 2, so both sides are given the same capacity factor and get the same C (in the table).
Both fill each expert's slots with all first choices (in token order) before any second choice
(DeepSpeed: ``locations2 += sum(mask1)`` over all first choices; ours: choice-rank-major fill
order) and renormalise the combine weights over the kept choices; a token that loses both
choices gets zeros on both sides. An equivalence check runs first on every E (skewed router,
T = 2048): the kept (token, choice) masks are compared, and the outputs and the expert-weight
gradients must agree to float rounding (printed, and in the JSON).

Points: for each E, capacity factor 1.25 and 2.0 on the plain input, and 1.25 with a skewed
router (``--skew-shift`` added to every input feature, as ``bench_moe_layer._inputs(shift=...)``
does: each expert's logit gains shift x the sum of its router weights, so the busiest experts
overflow). Each (variant, point) runs in its own subprocess (memory numbers do not leak); the
method is ``bench_moe_layer.py``'s and its helpers are imported from it: on the CPU the wall
time of one forward+backward and the step's peak transient memory ``VmHWM - VmRSS(before)``
after ``echo 5 > /proc/self/clear_refs``, with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed
buffers leave RSS; median of ``--repeats`` (default 3) steps after ``--warmup`` (default 1)
full-size step. Parameter gradients are zeroed with ``set_to_none=False`` before each step (as in
``bench_moe_layer.py``: a gradient-accumulation micro-step), so each weight gradient is a
temporary added into ``.grad``: ours computes the E experts' gradient of a layer as one
(E, in, out) tensor, DeepSpeed one expert's at a time. With ``--device cuda``:
``torch.cuda.synchronize()`` around each step, median of 20 after 3, peak =
``max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus ``memory_allocated()``
before; DeepSpeed's process group uses NCCL.

The floor: the expert GEMM FLOPs of one step, 3 (forward, input grad, weight grad) x 2 x T x K x
(d x 4d x 2) (each of the T*K assignments through both linear layers), divided by the machine's
GEMM rate, measured in the same run (a subprocess) on a (T*K, d) x (d, 4d) matmul of the same
dtype and device, before and after the points; the higher of the two rates is used, so the floor
is the most optimistic. Each variant's time is also given as a multiple of the floor. On a shared
CPU the load averages (``uptime``) before and after are recorded; with other processes on the
cores, ``--threads 1`` is the fairer setting: with two OpenMP threads every parallel operator can
wait a scheduler slice for its second thread, which penalises DeepSpeed's per-expert loop (many
small operators) far more than ours. The commit and the state of ``mgmoe_ds/moe`` (files changed
since it) are recorded, since the layer under test changes while the benchmark runs.

Targets of issue 16, evaluated at the end: ours no slower than DeepSpeed at every point; at most
0.6x DeepSpeed's time at capacity factor 2.0 and with the skewed router; less peak memory at
every point.

Usage::

    PYTHONPATH=. python bench/bench_token_moe.py --threads 1          # CPU fp32, d=256 (~5 min on 2 cores)
    PYTHONPATH=. python bench/bench_token_moe.py --quick              # smoke, < 1 min
    PYTHONPATH=. python bench/bench_token_moe.py --profile 64 2.0 0   # torch.profiler, one point, both sides
    PYTHONPATH=. python bench/bench_token_moe.py --device cuda --dtype bf16   # one GPU, d=1024 (~3 min)

Writes ``bench/results/token_moe_<device>_<dtype>[_quick].json`` (or ``--out``) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_moe_layer import _run_child as run_worker
from bench_moe_layer import (
    DTYPES,
    _sync,
    _timed_step,
    _torch_dtype,
    init_deepspeed_single_process,
    machine_info,
    mib,
)

EXPERTS = (8, 32, 64)
TOP_K = 2
TOKENS = 16384
HIDDEN = {"cpu": 256, "cuda": 1024}  # default d per device
CAPACITY_FACTORS = (1.25, 2.0)
SKEW_SHIFT = 0.5  # max/mean load about 1.7 (E=8), 3.9 (E=32), 6.7 (E=64) at d=256
SKEW_CAPACITY_FACTOR = 1.25
MIN_CAPACITY = 4
SEED = 1234
REPEATS = {"cpu": 3, "cuda": 20}
WARMUP = {"cpu": 1, "cuda": 3}
CHECK_TOKENS = 2048
VARIANTS = ("ours", "deepspeed")
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
TARGET_FAST_RATIO = 0.6  # ours / DeepSpeed at cf 2.0 and with the skewed router


def results_path(device: str, dtype: str, quick: bool) -> Path:
    return RESULTS_DIR / f"token_moe_{device}_{dtype}{'_quick' if quick else ''}.json"


def step_flops(tokens: int, hidden: int) -> float:
    """Expert GEMM FLOPs of one forward+backward: 3 x 2 x T x K x (d x 4d x 2)."""
    return 3 * 2 * tokens * TOP_K * (hidden * 4 * hidden * 2)


# ----------------------------------------------------------------------------------------------
# Inputs and weights, drawn on the CPU so that every device sees the same numbers


def _inputs(tokens: int, hidden: int, device: str, dtype: str, shift: float = 0.0):
    """The input (requires grad) and upstream gradient; ``shift`` skews the router (see the docstring)."""
    import torch
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, hidden, generator=g) + shift
    gy = torch.randn(tokens, hidden, generator=g)
    kind = _torch_dtype(dtype)
    return x.to(device=device, dtype=kind).requires_grad_(True), gy.to(device=device, dtype=kind)


def _mlp(hidden: int):
    from torch import nn
    return nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))


def _expert_states(experts: int, hidden: int) -> list[dict]:
    """One seeded ``nn.Sequential`` state dict per expert: ``0.weight`` (4d, d), ..., ``2.bias`` (d,)."""
    import torch
    states = []
    for i in range(experts):
        torch.manual_seed(SEED + 1 + i)
        states.append(_mlp(hidden).state_dict())
    return states


def _router_weight(experts: int, hidden: int):
    import torch
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(experts, hidden, generator=g) * 0.02  # (E, d)


# ----------------------------------------------------------------------------------------------
# The two layers


def build_ours(experts: int, hidden: int, factor: float, device: str, dtype: str):
    import torch

    from mgmoe_ds.moe.batched import grouped_mm_runs
    from mgmoe_ds.moe.token_layer import BatchedRoutedExperts

    torch.manual_seed(SEED - 1)
    layer = BatchedRoutedExperts(experts, (hidden, 4 * hidden, hidden), router_dim=hidden, top_k=TOP_K,
                                 capacity_factor=factor, eval_capacity_factor=factor, min_capacity=MIN_CAPACITY)
    with torch.no_grad():
        layer.router.gate.weight.copy_(_router_weight(experts, hidden))
    state = {}
    for i, s in enumerate(_expert_states(experts, hidden)):
        state.update({f"{i}.fc1.weight": s["0.weight"], f"{i}.fc1.bias": s["0.bias"],
                      f"{i}.fc2.weight": s["2.weight"], f"{i}.fc2.bias": s["2.bias"]})
    layer.local_experts.load_state_dict(state)
    layer.to(device=device, dtype=_torch_dtype(dtype))  # the router still computes its gate in fp32
    layer.train()

    def step(x, gy):
        out = layer(x, {"x": x})
        loss = (out.output * gy).sum() + 0.01 * out.aux_losses["load_balance"] + 0.001 * out.aux_losses["z_loss"]
        loss.backward()
        return out

    def route(x):
        """A no-grad forward's kept (T, K) mask, expert ids (T, K), capacity, rows the experts compute on
        (padding included) and (E,) load."""
        with torch.no_grad():
            r = layer(x, {"x": x}).route
        kept_per_expert = r.load_per_expert - r.dropped_per_expert  # (E,)
        widths_aligned = hidden * torch.empty((), dtype=_torch_dtype(dtype)).element_size() % 16 == 0
        grouped = widths_aligned and grouped_mm_runs(device, _torch_dtype(dtype))  # the layer's own choice: no padding
        rows = int(kept_per_expert.sum()) if grouped else experts * int(kept_per_expert.max())
        return r.kept, r.expert_indices, r.capacity, rows, r.load_per_expert

    return layer, step, route


def build_deepspeed(experts: int, hidden: int, factor: float, device: str, dtype: str):
    import torch
    from deepspeed.moe.layer import MoE

    init_deepspeed_single_process(device)
    layer = MoE(hidden_size=hidden, expert=_mlp(hidden), num_experts=experts, ep_size=1, k=TOP_K,
                capacity_factor=factor, eval_capacity_factor=factor, min_capacity=MIN_CAPACITY, drop_tokens=True,
                top2_2nd_expert_sampling=False)  # deterministic 2nd choice, like ours
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        for expert, state in zip(layer.deepspeed_moe.experts.deepspeed_experts, _expert_states(experts, hidden)):
            expert.load_state_dict(state)
        layer.deepspeed_moe.gate.wg.weight.copy_(_router_weight(experts, hidden))
    layer.to(device=device, dtype=_torch_dtype(dtype))  # TopKGate computes its logits in fp32 itself
    layer.train()

    def step(x, gy):
        out, l_aux, _ = layer(x.unsqueeze(0))  # (1, T, d)
        loss = (out.squeeze(0) * gy).sum() + 0.01 * l_aux
        loss.backward()
        return out

    def route(x):
        with torch.no_grad():
            gate = layer.deepspeed_moe.gate(x.reshape(-1, x.shape[-1]), None, True)  # sparse routes
        _, cap, _, indices, _, _, exp_counts = gate  # indices (K, T) int32, -1 where dropped
        indices = indices.t().long()  # (T, K)
        return indices >= 0, indices, int(cap), experts * int(cap), exp_counts

    return layer, step, route


def build(variant: str, experts: int, hidden: int, factor: float, device: str, dtype: str):
    if variant == "deepspeed":
        return build_deepspeed(experts, hidden, factor, device, dtype)
    return build_ours(experts, hidden, factor, device, dtype)


# ----------------------------------------------------------------------------------------------
# Workers (each in its own subprocess)


def worker(variant: str, experts: int, tokens: int, hidden: int, factor: float, shift: float, repeats: int,
           warmup: int, device: str, dtype: str) -> dict:
    import torch

    torch.manual_seed(0)
    layer, step, route = build(variant, experts, hidden, factor, device, dtype)
    x, gy = _inputs(tokens, hidden, device, dtype, shift)
    for _ in range(warmup):  # full size: kernels, workspaces and the allocator's pool ready
        step(x, gy)
    times, cpu_times, peaks = [], [], []
    for _ in range(repeats):
        layer.zero_grad(set_to_none=False)
        x.grad = None
        wall, cpu, peak = _timed_step(step, x, gy, device)
        times.append(wall)
        cpu_times.append(cpu)
        peaks.append(peak)
    kept, _, cap, rows, load = route(x)
    return {
        "variant": variant, "experts": experts, "tokens": tokens, "hidden": hidden, "capacity_factor": factor,
        "input_shift": shift, "device": device, "dtype": dtype, "warmup": warmup, "repeats": repeats,
        "times_s": times, "median_s": statistics.median(times),
        "cpu_times_s": cpu_times, "median_cpu_s": statistics.median(cpu_times),
        "peak_bytes": peaks, "median_peak_bytes": statistics.median(peaks),
        "capacity": cap,
        "dropped_fraction": 1.0 - float(kept.float().mean()),  # of the T*K assignments
        "load_max_over_mean": float(load.max().float() / load.float().mean()),
        "expert_rows": rows,  # rows each linear layer of the experts computes on (padding included)
        "threads": torch.get_num_threads(),
        "expert_chunks": len(layer.local_experts.chunk_bounds) if variant != "deepspeed" else None,
    }


def gemm_rate(tokens: int, hidden: int, device: str, dtype: str) -> dict:
    """GFLOP/s of a (T*K, d) x (d, 4d) matmul: median over timed batches of back-to-back products."""
    import torch
    kind = _torch_dtype(dtype)
    a = torch.randn(tokens * TOP_K, hidden, device=device, dtype=kind)
    b = torch.randn(hidden, 4 * hidden, device=device, dtype=kind)
    flops = 2 * tokens * TOP_K * hidden * 4 * hidden
    per_batch = 50 if device == "cuda" else 1
    for _ in range(3):
        torch.matmul(a, b)
    rates = []
    for _ in range(10 if device == "cuda" else 5):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(per_batch):
            torch.matmul(a, b)
        _sync(device)
        rates.append(flops * per_batch / (time.perf_counter() - t0) / 1e9)
    return {"shape": [tokens * TOP_K, hidden, 4 * hidden], "gflops": statistics.median(rates), "samples": rates}


def check_equivalence(experts_list: list[int], hidden: int, factor: float, shift: float, device: str,
                      dtype: str, variants: list[str]) -> list[dict]:
    """Same weights, same input: the same kept assignments, outputs and expert-weight gradients."""
    import torch

    rows = []
    for experts, variant in ((e, v) for e in experts_list for v in variants if v != "deepspeed"):
        ours, ours_step, ours_route = build(variant, experts, hidden, factor, device, dtype)
        ds, ds_step, ds_route = build_deepspeed(experts, hidden, factor, device, dtype)
        x, gy = _inputs(CHECK_TOKENS, hidden, device, dtype, shift)
        xa, xb = (x.detach().clone().requires_grad_(True) for _ in range(2))
        out_a = ours_step(xa, gy).output
        out_b = ds_step(xb, gy).reshape(CHECK_TOKENS, hidden)
        kept_a, idx_a, cap_a, _, _ = ours_route(x.detach())
        kept_b, idx_b, cap_b, _, _ = ds_route(x.detach())
        grads_a = torch.cat([ours.local_experts.stacked_grads(layer)[0].transpose(1, 2).flatten()
                             for layer in range(2)])  # (E, out, in) per layer: nn.Linear's layout
        ds_experts = ds.deepspeed_moe.experts.deepspeed_experts
        grads_b = torch.cat([torch.stack([e[0].weight.grad for e in ds_experts]).flatten(),
                             torch.stack([e[2].weight.grad for e in ds_experts]).flatten()])
        rows.append({
            "variant": variant, "experts": experts, "tokens": CHECK_TOKENS, "capacity_factor": factor,
            "input_shift": shift,
            "capacity_ours": cap_a, "capacity_deepspeed": cap_b,
            "kept_masks_equal": bool(torch.equal(kept_a.cpu(), kept_b.cpu())),
            "kept_experts_equal": bool(torch.equal(idx_a[kept_a].cpu(), idx_b[kept_b].cpu())),
            "dropped_fraction": 1.0 - float(kept_a.float().mean()),
            "max_abs_diff_output": float((out_a.float() - out_b.detach().float()).abs().max()),
            "max_abs_output": float(out_b.detach().float().abs().max()),
            "max_abs_diff_input_grad": float((xa.grad.float() - xb.grad.float()).abs().max()),
            "max_abs_diff_expert_weight_grads": float((grads_a.float() - grads_b.float()).abs().max()),
            "max_abs_expert_weight_grad": float(grads_b.float().abs().max()),
        })
    return rows


def profile(experts: int, tokens: int, hidden: int, factor: float, shift: float, device: str, dtype: str,
            variants: list[str]) -> str:
    """torch.profiler over one warm forward+backward of each variant: the top operators by self time."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    text = []
    for variant in variants:
        layer, step, _ = build(variant, experts, hidden, factor, device, dtype)
        x, gy = _inputs(tokens, hidden, device, dtype, shift)
        step(x, gy)
        layer.zero_grad(set_to_none=False)
        x.grad = None
        _sync(device)
        with torch_profile(activities=activities) as prof:
            step(x, gy)
            _sync(device)
        text.append(f"## {variant}: E={experts} T={tokens} d={hidden} cf={factor} shift={shift}\n"
                    + prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=40))
    return "\n\n".join(text)


# ----------------------------------------------------------------------------------------------
# Driver


def _run_child(args: list[str]) -> dict:
    return run_worker(args, script=__file__)


def _code_version() -> dict:
    """The commit, and the files of ``mgmoe_ds/moe`` changed since it (other edits land while we run)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:  # no git on the machine
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "changed": git("status", "--short", "--", "mgmoe_ds/moe").splitlines()}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _points(experts: list[int], skew_shift: float) -> list[tuple[int, float, float]]:
    """(E, capacity factor, input shift) for each point."""
    points = []
    for e in experts:
        points += [(e, cf, 0.0) for cf in CAPACITY_FACTORS]
        if skew_shift:
            points.append((e, SKEW_CAPACITY_FACTOR, skew_shift))
    return points


def evaluate_targets(points: list[dict]) -> dict:
    """The issue's three targets, each with the points that miss it."""
    slower = [p["label"] for p in points if p["time_ratio"] > 1.0]
    fast_points = [p for p in points if p["capacity_factor"] == 2.0 or p["input_shift"]]
    not_fast = [p["label"] for p in fast_points if p["time_ratio"] > TARGET_FAST_RATIO]
    more_memory = [p["label"] for p in points if p["mem_ratio"] >= 1.0]
    return {
        "no_slower_everywhere": {"met": not slower, "misses": slower},
        f"at_most_{TARGET_FAST_RATIO}x_at_cf2_and_skewed": {"met": not not_fast, "misses": not_fast},
        "less_memory_everywhere": {"met": not more_memory, "misses": more_memory},
    }


def render(results: dict) -> str:
    c, m = results["config"], results["machine"]
    cuda = c["device"] == "cuda"
    where = (f"GPU {m.get('gpu')} (torch {m['torch']}, CUDA {m.get('cuda')}, deepspeed {m['deepspeed']}, "
             f"backend {m['dist_backend']})" if cuda else
             f"CPU {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads; torch {m['torch']}, "
             f"deepspeed {m['deepspeed']})")
    peak = "CUDA allocator" if cuda else "RSS"
    rate = results["gemm"]
    lines = [
        f"Device: {where}; dtype {c['dtype']}; T={c['tokens']}, d={c['hidden']} (MLP d->4d->d, GELU), K={TOP_K}, "
        f"min_capacity={MIN_CAPACITY}; skewed = input shifted by {c['skew_shift']:g}.",
        f"Method: median of {c['repeats']} forward+backward steps after {c['warmup']} warm-up, each (variant, point) "
        f"in its own subprocess; peak = the step's transient memory ({peak}).",
        f"GEMM rate ({rate['shape'][0]}x{rate['shape'][1]} @ {rate['shape'][1]}x{rate['shape'][2]}): "
        f"{rate['start']['gflops']:.1f} GFLOP/s before, {rate['end']['gflops']:.1f} after; the floor uses "
        f"{rate['gflops']:.1f} (step FLOPs {results['step_gflop']:.1f} GFLOP).",
        f"Load: `{results['uptime_start']}` before; `{results['uptime_end']}` after.",
        f"Code: {results['code_start']['commit']} (changed in mgmoe_ds/moe: "
        f"{', '.join(results['code_start']['changed']) or 'none'}) at the start; "
        f"{results['code_end']['commit']} ({', '.join(results['code_end']['changed']) or 'none'}) at the end.",
        "",
    ]
    extra = [v for v in c["variants"] if v not in ("ours", "deepspeed")]
    header = ("| E | cf | router | C | ours chunks | ours ms | DS ms | ours/DS | ours MiB | DS MiB | mem ours/DS "
              "| floor ms | ours/floor | DS/floor | dropped ours | dropped DS | rows ours/DS |"
              + "".join(f" {v} ms | {v}/DS | {v} MiB |" for v in extra))
    lines += [header, "|" + "---:|" * (17 + 3 * len(extra))]
    for p in results["points"]:
        o, d = p["ours"], p["deepspeed"]
        lines.append(
            f"| {p['experts']} | {p['capacity_factor']:g} | {'skewed' if p['input_shift'] else 'plain'} | "
            f"{d['capacity']} | {o.get('expert_chunks') or '-'} | {o['median_s'] * 1e3:.1f} | "
            f"{d['median_s'] * 1e3:.1f} | {p['time_ratio']:.2f} | "
            f"{mib(o['median_peak_bytes']):.0f} | {mib(d['median_peak_bytes']):.0f} | {p['mem_ratio']:.2f} | "
            f"{p['floor_s'] * 1e3:.1f} | {o['median_s'] / p['floor_s']:.1f} | {d['median_s'] / p['floor_s']:.1f} | "
            f"{o['dropped_fraction']:.3f} | {d['dropped_fraction']:.3f} | {o['expert_rows'] / d['expert_rows']:.2f} |"
            + "".join(f" {p[v]['median_s'] * 1e3:.1f} | {p[v]['median_s'] / d['median_s']:.2f} | "
                      f"{mib(p[v]['median_peak_bytes']):.0f} |" for v in extra))
    lines += ["", "Targets (issue 16):"]
    for name, verdict in results["targets"].items():
        lines.append(f"- {name}: {'MET' if verdict['met'] else 'MISSED'}"
                     + ("" if verdict["met"] else f" at {', '.join(verdict['misses'])}"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=VARIANTS, help="(internal) one (variant, point)")
    parser.add_argument("--gemm", action="store_true", help="(internal) the GEMM-rate worker")
    parser.add_argument("--check", action="store_true", help="(internal) the equivalence worker")
    parser.add_argument("--profile", nargs=3, type=float, metavar=("E", "CF", "SHIFT"),
                        help="profile one point with torch.profiler (both sides, in this process) and exit")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU (cuda:0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS))
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--hidden", type=int, default=0, help="d (0: 256 on cpu, 1024 on cuda)")
    parser.add_argument("--capacity-factor", type=float, default=1.25, help="(internal) the worker's factor")
    parser.add_argument("--input-shift", type=float, default=0.0, help="(internal) the worker's input shift")
    parser.add_argument("--skew-shift", type=float, default=SKEW_SHIFT,
                        help="input shift of the skewed-router points (0: no skewed points)")
    parser.add_argument("--repeats", type=int, default=0, help="timed steps per point (0: 3 on cpu, 20 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="full-size untimed steps (default 1 cpu, 3 cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["ours", "deepspeed"],
                        help="the sides to run (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke: E=8, T=2048, d=64, 1 repeat (< 1 min on CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if args.quick:
        args.experts, args.tokens, args.hidden = [8], 2048, args.hidden or 64
        args.repeats = args.repeats or 1
    hidden = args.hidden or HIDDEN[args.device]
    repeats = args.repeats or REPEATS[args.device]
    warmup = args.warmup if args.warmup is not None else WARMUP[args.device]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    common = ["--device", args.device, "--dtype", args.dtype, "--tokens", str(args.tokens), "--hidden", str(hidden),
              "--threads", str(args.threads)]

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.experts[0], args.tokens, hidden, args.capacity_factor,
                                           args.input_shift, repeats, warmup, args.device, args.dtype)))
        return
    if args.gemm:
        print("RESULT " + json.dumps(gemm_rate(args.tokens, hidden, args.device, args.dtype)))
        return
    if args.check:
        print("RESULT " + json.dumps(check_equivalence(args.experts, hidden, args.capacity_factor, args.input_shift,
                                                       args.device, args.dtype, args.variants)))
        return

    import torch
    if cuda and not torch.cuda.is_available():
        sys.exit(f"bench_token_moe.py: --device cuda: no CUDA GPU visible to torch {torch.__version__}")
    if args.profile:
        experts, factor, shift = int(args.profile[0]), args.profile[1], args.profile[2]
        print(profile(experts, args.tokens, hidden, factor, shift, args.device, args.dtype,
                      list(dict.fromkeys(["ours", "deepspeed", *args.variants]))))
        return

    variants = list(dict.fromkeys(["ours", "deepspeed", *args.variants]))
    started = time.time()
    results = {
        "config": {"experts": args.experts, "tokens": args.tokens, "hidden": hidden, "ffn": 4 * hidden,
                   "top_k": TOP_K, "capacity_factors": list(CAPACITY_FACTORS), "skew_shift": args.skew_shift,
                   "skew_capacity_factor": SKEW_CAPACITY_FACTOR, "min_capacity": MIN_CAPACITY,
                   "device": args.device, "dtype": DTYPES[args.dtype], "repeats": repeats, "warmup": warmup,
                   "variants": variants, "quick": args.quick},
        "machine": machine_info(args.device),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "uptime_start": _uptime(),
        "code_start": _code_version(),
    }
    print(f"load before: {results['uptime_start']}", flush=True)
    # the skewed router, where capacity drops happen, at a small T; the capacity rule and fill order must agree
    results["equivalence"] = _run_child(["--check", "--device", args.device, "--dtype", args.dtype, "--tokens",
                                         str(CHECK_TOKENS), "--hidden", str(hidden), "--threads", str(args.threads),
                                         "--experts", *map(str, args.experts), "--capacity-factor",
                                         str(SKEW_CAPACITY_FACTOR), "--input-shift", str(args.skew_shift or SKEW_SHIFT),
                                         "--variants", *variants])
    for row in results["equivalence"]:
        print("equivalence:", json.dumps(row), flush=True)
    gemm_start = _run_child(["--gemm", *common])
    print(f"GEMM rate: {gemm_start['gflops']:.1f} GFLOP/s", flush=True)
    results["points"] = []
    for n, (experts, factor, shift) in enumerate(_points(args.experts, args.skew_shift)):
        label = f"E={experts} cf={factor:g}{' skewed' if shift else ''}"
        row = {"label": label, "experts": experts, "capacity_factor": factor, "input_shift": shift}
        order = variants if n % 2 == 0 else variants[::-1]  # slow phases of a shared machine hit both sides
        for variant in order:
            row[variant] = _run_child(["--worker", variant, *common, "--experts", str(experts), "--capacity-factor",
                                       str(factor), "--input-shift", str(shift), "--repeats", str(repeats),
                                       "--warmup", str(warmup)])
            r = row[variant]
            print(f"  {label:22s} {variant:13s} median {r['median_s'] * 1e3:8.1f} ms "
                  f"times {[round(t * 1e3, 1) for t in r['times_s']]} peak {mib(r['median_peak_bytes']):.0f} MiB "
                  f"C={r['capacity']} dropped {r['dropped_fraction']:.3f} rows {r['expert_rows']}", flush=True)
        row["time_ratio"] = row["ours"]["median_s"] / row["deepspeed"]["median_s"]
        row["mem_ratio"] = row["ours"]["median_peak_bytes"] / row["deepspeed"]["median_peak_bytes"]
        results["points"].append(row)
    gemm_end = _run_child(["--gemm", *common])
    best = max(gemm_start["gflops"], gemm_end["gflops"])
    results["gemm"] = {"shape": gemm_start["shape"], "start": gemm_start, "end": gemm_end, "gflops": best}
    results["step_gflop"] = step_flops(args.tokens, hidden) / 1e9
    for row in results["points"]:
        row["floor_s"] = step_flops(args.tokens, hidden) / (best * 1e9)
    results["targets"] = evaluate_targets(results["points"])
    results["uptime_end"] = _uptime()
    results["code_end"] = _code_version()
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - started
    out_path = args.out or results_path(args.device, args.dtype, args.quick)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1))
    print()
    print(f"Command: {results['command']}")
    print(render(results))
    print(f"\nwall {results['wall_s']:.0f}s; raw results in {out_path}")


if __name__ == "__main__":
    main()
