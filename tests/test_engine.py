"""The training job end to end, as a user runs it: stages, checkpoints, resume, ranks and nodes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import (
    DEEPSPEED,
    EQUIVALENCE_EXPERTS,
    ROOT,
    TINY_MGMOE,
    launch_training,
    succeeded,
    write_small_set,
    write_tiny_config,
)
from dist_utils import free_port

TRAIN = [sys.executable, str(ROOT / "jobs" / "train.py")]


def run_job(args: list[str], timeout: float = 420, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher + [str(ROOT / "jobs" / "train.py")] if launcher else TRAIN) + args
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def load_state(run: Path, tag: str) -> dict[str, torch.Tensor]:
    from mgmoe_ds.moe.deepspeed_compat import consolidate_expert_checkpoint

    return consolidate_expert_checkpoint(str(run / "checkpoints"), tag)


def changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, f"no tensor starts with {prefix}"
    return any(not torch.equal(before[k], after[k]) for k in keys)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_dataset):
    """One uninterrupted single-process run with a periodic checkpoint (shared by several tests)."""
    tmp = tmp_path_factory.mktemp("full")
    config = write_tiny_config(tmp / "ds.json", train={"seed": 0, "log_every": 2, "checkpoint_every": 3})
    run = tmp / "run"
    result = checked(run_job(["--deepspeed", str(config), "--data", str(tiny_dataset), "--output", str(run)]))
    (tmp / "job_output.txt").write_text(result.stdout + result.stderr)
    return config, run


@pytest.mark.slow
def test_the_closing_summary_names_the_runs_files_and_its_next_commands_run_as_printed(full_run, tmp_path):
    _, run = full_run
    output = (run.parent / "job_output.txt").read_text()
    # each stage says how long it will take, from its measured step time, and again at each epoch end
    for stage in ("warmup", "routing", "residual"):
        assert re.search(rf"stage {stage}: \d+\.\d\d s/step measured; about .+ left \(\d+ steps\), ends ~\d\d:\d\d",
                         output), stage
        assert re.search(rf"stage {stage}: epoch 1 took .+ \(validation .+\)", output), stage
    lines = output[output.index("done: validation top-1"):].splitlines()
    assert next(line for line in lines if line.startswith("  run folder")).split() == ["run", "folder", str(run)]
    last = json.loads((run / "checkpoints" / "last_good.json").read_text())["tag"]
    assert f"(last good: {last}; continue with --resume {run})" in output and (run / "checkpoints" / last).is_dir()
    for name in ("metrics.jsonl", "final_metrics.json", "stages"):
        assert str(run / name) in output and (run / name).exists()
    commands = [line.split("#")[0].split() for line in lines[lines.index("next:") + 1:] if line.startswith("  mgmoe ")]
    assert [c[1] for c in commands] == ["eval", "ablate", "export", "predict"]
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), (120, 200, 40)).save(photo)
    for command in commands:
        args = [str(photo) if a == "PHOTO_OR_FOLDER" else a for a in command[1:] if a != "..."]
        if args[0] in ("eval", "ablate"):
            args.append("--no-progress")
        result = subprocess.run([sys.executable, "-m", "mgmoe_ds.cli", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-3000:]}"
    assert (run / "eval" / "report.json").is_file() and (run / "ablation" / "ablation.json").is_file()
    # the closing test accuracy by long-tail bucket is what `mgmoe eval` computes on its own
    report = json.loads((run / "eval" / "report.json").read_text())["variants"]["routed"]
    final = json.loads((run / "final_metrics.json").read_text())["test"]
    assert final["top1"] == pytest.approx(report["top1"])
    assert final["buckets"].keys() == report["buckets"].keys()
    for name, bucket in report["buckets"].items():
        assert final["buckets"][name]["images"] == bucket["images"]
        assert final["buckets"][name]["top1"] == pytest.approx(bucket["top1"])
    shown = ", ".join(f"{n} {b['top1']:.3f} ({b['classes']} species)" for n, b in report["buckets"].items()
                      if b["top1"] is not None)
    assert f"  test top-1 by training frequency: {shown}" in lines
    assert (run / "model.safetensors").is_file() and "photo.jpg" in result.stdout


@pytest.mark.slow
def test_stages_train_exactly_their_parameter_groups(full_run):
    _, run = full_run
    stages = [json.loads((run / "stages" / f"{i}_{n}.json").read_text())
              for i, n in enumerate(["warmup", "routing", "residual"])]
    assert "router" not in stages[0]["trained_groups"] and "backbone" in stages[0]["trained_groups"]
    assert "router" in stages[1]["trained_groups"] and stages[1]["clusters"]["num_clusters"] == 3
    residual = stages[2]
    top2 = residual["clusters"]["top2_experts"]
    unfrozen = {int(e) for e in residual["unfrozen_heads"]}
    assert unfrozen == {e for pair in top2 for e in pair}
    assert set(residual["trained_groups"]) == {"router", "expert_heads"}
    # every stage reports what capacity dropped; the residual stage trains dropless, as it is evaluated
    assert all({"choices", "dropped", "dropped_fraction"} <= set(s) for s in stages)
    assert residual["routing"]["dropless"] and residual["dropped"] == 0 and residual["choices"] > 0

    warm, routing, final = (load_state(run, t) for t in ("stage0-warmup-end", "stage1-routing-end",
                                                          "stage2-residual-end"))
    assert changed(warm, routing, "moe.router.")  # stage 1 trains the router
    # Stage 2 moves the router and the heads of its clusters' experts, and not one other tensor.
    from mgmoe_ds.inference import load_trained

    model, _ = load_trained(run)  # at P = 1: every expert, with the names the checkpoint uses
    names = {id(p): n for n, p in model.named_parameters()}
    heads = {e: {names[id(p)] for p in params} for e, params in model.head_parameters_by_expert().items()}
    trained = {k for k in final if k.startswith("moe.router.")} | {n for e in unfrozen for n in heads[e]}
    moved = {k for k in final if not torch.equal(routing[k], final[k])}
    assert moved <= trained, f"stage 2 moved tensors it does not train: {sorted(moved - trained)[:5]}"
    assert changed(routing, final, "moe.router.")
    assert moved & {n for e in unfrozen for n in heads[e]}  # and it did train heads
    assert len(final) - len(trained) > 100  # the backbone, the expert bodies, the frozen heads: all unmoved
    # metrics.jsonl has train and validation events with the promised fields
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["event"] == "train"]
    assert {"stage", "epoch", "step", "losses", "lr", "samples_per_s", "expert_load", "dropped",
            "dropped_fraction"} <= set(train_events[0])
    assert any(e["event"] == "validation" and "val_top5" in e for e in events)
    assert json.loads((run / "final_metrics.json").read_text())["test"]["images"] == 16


def kill_after_checkpoint(command: list[str], run: Path, wanted) -> dict:
    """Starts ``command`` (a whole process group: a launcher and its ranks), SIGKILLs every process
    as soon as ``checkpoints/last_good.json`` satisfies ``wanted``, and returns that pointer."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pointer = run / "checkpoints" / "last_good.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if pointer.is_file() and wanted(json.loads(pointer.read_text())):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished (or failed) before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "final_metrics.json").exists()
    return json.loads(pointer.read_text())


def assert_same_run(got: Path, expected: Path) -> None:
    """Bit-identical final weights and metrics."""
    tag = "stage2-residual-end"
    reference, resumed = load_state(expected, tag), load_state(got, tag)
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), f"{key} differs after the resume"
    assert json.loads((got / "final_metrics.json").read_text()) == json.loads((expected / "final_metrics.json").read_text())


MID_STAGE = ("mid-stage", lambda p: not p["stage_complete"] and p["stage_index"] == 1)
STAGE_END = ("stage end", lambda p: p["tag"] == "stage0-warmup-end")


@pytest.mark.slow
@pytest.mark.parametrize("kind, wanted", [MID_STAGE, STAGE_END], ids=["mid_stage", "stage_end"])
def test_sigkill_after_a_checkpoint_then_resume_is_the_uninterrupted_run_at_one_rank(full_run, tiny_dataset,
                                                                                      tmp_path, kind, wanted):
    config, reference = full_run
    run = tmp_path / "run"
    command = TRAIN + ["--deepspeed", str(config), "--data", str(tiny_dataset), "--output", str(run)]
    killed_at = kill_after_checkpoint(command, run, wanted)
    assert wanted(killed_at), f"killed after {killed_at}, not after a {kind} checkpoint"
    succeeded(launch_training(config, tiny_dataset, run, resume=True))
    assert_same_run(run, reference)


# A cache at a depth of the backbone: stages train the blocks above the cut from it
CUT_AFTER = 3
TOP_STAGES = {"stages": [
    {"name": "warmup", "steps": 3, "lr": {"backbone_top": 1e-3, "experts": 2e-3, "expert_heads": 2e-3, "fallback": 2e-3}},
    {"name": "routing", "steps": 4, "lr": {"backbone_top": 5e-4, "router": 2e-3, "experts": 1e-3,
                                           "expert_heads": 1e-3, "fallback": 2e-3}},
    {"name": "residual", "steps": 2}], "num_clusters": 2}


@pytest.fixture(scope="module")
def top_run(tmp_path_factory, tiny_dataset):
    """One uninterrupted run of a tiny EfficientNet whose feature cache sits after block 3."""
    tmp = tmp_path_factory.mktemp("top")
    config = write_tiny_config(tmp / "ds.json", model=dict(TINY_MGMOE["model"], backbone="tf_efficientnet_lite0",
                                                           backbone_options={}),
                               cache={"depth": CUT_AFTER}, curriculum=TOP_STAGES,
                               train={"seed": 0, "log_every": 2, "checkpoint_every": 2})
    run = tmp / "run"
    result = succeeded(launch_training(config, tiny_dataset, run))
    return config, run, result.stdout + result.stderr


@pytest.mark.slow
def test_stages_train_the_backbones_top_from_a_cache_at_depth_and_nothing_below_it(top_run):
    _, run, log = top_run
    records = [json.loads((run / "stages" / f"{i}_{n}.json").read_text())
               for i, n in enumerate(["warmup", "routing", "residual"])]
    caches = [r["feature_cache"] for r in records]
    assert all(c["depth"] == CUT_AFTER for c in caches)
    assert caches[1]["reused"] and caches[1]["key"] == caches[0]["key"]  # training the top keeps the cache
    assert "backbone_top" in records[1]["trained_groups"] and "backbone" not in records[1]["trained_groups"]
    # one pass of the lower part over train and one over val, for the whole run
    assert log.count(" built in ") == 2 and "the backbone's blocks after 3 run on it each step" in log
    warm, routing = load_state(run, "stage0-warmup-end"), load_state(run, "stage1-routing-end")
    top = re.compile(r"^backbone\.model\.(blocks\.[4-6]\.|conv_head\.|bn2\.)")  # above block 3 of Lite0's 0..6
    lower = [k for k in warm if k.startswith("backbone.") and not top.match(k)]
    top_weights = [k for k in warm if top.match(k) and k.endswith(".weight")]
    top_statistics = [k for k in warm if top.match(k) and k.endswith(("running_mean", "running_var"))]
    assert lower and top_weights and top_statistics
    assert all(torch.equal(warm[k], routing[k]) for k in lower)  # the cached part never moves
    assert any(not torch.equal(warm[k], routing[k]) for k in top_weights)  # the top trains
    assert all(torch.equal(warm[k], routing[k]) for k in top_statistics)  # with frozen BatchNorm statistics


@pytest.mark.slow
def test_a_resume_inside_a_stage_that_trains_the_backbones_top_is_the_uninterrupted_run(top_run, tiny_dataset,
                                                                                       tmp_path):
    config, reference, _ = top_run
    run = tmp_path / "run"
    succeeded(launch_training(config, tiny_dataset, run, extra=("--max-steps", "5")))  # 3 warm-up + 2 of routing
    pointer = json.loads((run / "checkpoints" / "last_good.json").read_text())
    assert pointer["stage_index"] == 1 and not pointer["stage_complete"]
    succeeded(launch_training(config, tiny_dataset, run, resume=True))
    assert_same_run(run, reference)


@pytest.mark.slow
def test_at_a_depth_expert_parallel_training_equals_data_parallel_training(tiny_dataset, tmp_path):
    # Two ranks, the backbone's top training from the cache (replicated, its gradients all-reduced)
    # next to experts split over the ranks (P = 2) or replicated (P = 1): the same weights. Plain
    # SGD at lr 0.1-0.2: Adam maps the last-bit differences of gradients near zero (summed in
    # another order at P = 2) to whole lr-sized steps, while under SGD a lost or doubled gradient
    # moves a weight by lr x gradient (about 1e-3 per step here) and only that shows.
    stages = json.loads(json.dumps(TOP_STAGES))
    for stage in stages["stages"]:
        stage["lr"] = {group: 100 * lr for group, lr in stage.get("lr", {"router": 1e-3, "expert_heads": 2e-3}).items()}
    states = {}
    for ep in (1, 2):
        config = write_tiny_config(tmp_path / f"p{ep}.json", model=dict(  # 64 px: level3 2x2, not 1x1
            TINY_MGMOE["model"], backbone="tf_efficientnet_lite0", backbone_options={}, img_size=64,
            experts=EQUIVALENCE_EXPERTS),
            moe={"expert_parallel_size": ep}, cache={"depth": CUT_AFTER}, curriculum=stages,
            train={"seed": 0, "log_every": 2})
        ds = json.loads(config.read_text())
        config.write_text(json.dumps(dict(ds, optimizer={"type": "SGD", "params": {"lr": 0.1}},
                                          zero_allow_untested_optimizer=True)))
        succeeded(launch_training(config, tiny_dataset, tmp_path / f"run{ep}", ranks=2))
        states[ep] = load_state(tmp_path / f"run{ep}", "stage2-residual-end")
    top = [k for k in states[1] if k.startswith("backbone.model.blocks.6.")]
    assert top and states[1].keys() == states[2].keys()
    for key, value in states[1].items():
        torch.testing.assert_close(states[2][key], value, atol=1e-4, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("kind, wanted", [MID_STAGE, STAGE_END], ids=["mid_stage", "stage_end"])
def test_sigkill_after_a_checkpoint_then_resume_is_the_uninterrupted_run_at_two_ranks(two_rank_runs, tiny_dataset,
                                                                                       tmp_path, kind, wanted):
    reference = two_rank_runs[2]
    run = tmp_path / "run"
    port = free_port()
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(ROOT / "jobs" / "train.py"),
               "--deepspeed", str(reference["config"]), "--data", str(tiny_dataset), "--output", str(run)]
    killed_at = kill_after_checkpoint(command, run, wanted)
    assert wanted(killed_at), f"killed after {killed_at}, not after a {kind} checkpoint"
    # DeepSpeed's CPU shared-memory all-reduce segments (one per rank, ~69 MB of RAM each) are
    # unlinked right after start-up: even a killed run leaves none in /dev/shm
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"shared-memory segments left by the killed run: {left}"
    succeeded(launch_training(reference["config"], tiny_dataset, run, ranks=2, resume=True))
    assert_same_run(run, reference["run"])


@pytest.mark.slow
def test_expert_parallel_training_equals_data_parallel_training(two_rank_runs):
    # Two ranks at P = 2 (each holds two of the four real experts) against the same two ranks at
    # P = 1 (every expert replicated): ZeRO-2, AdamW, the experts' own mean-reduced losses, every
    # stage. Equal up to fp32 summation order: a lost 1/P on an expert loss, or gradients summed
    # out of order, move weights by about the learning rate (2e-3) per step.
    for tag in ("stage0-warmup-end", "stage1-routing-end", "stage2-residual-end"):
        data_parallel, expert_parallel = (load_state(two_rank_runs[p]["run"], tag) for p in (1, 2))
        assert data_parallel.keys() == expert_parallel.keys()
        for key, value in data_parallel.items():
            torch.testing.assert_close(expert_parallel[key], value, atol=1e-4, rtol=0, msg=f"{tag}: {key}")
    metrics = [json.loads((two_rank_runs[p]["run"] / "final_metrics.json").read_text()) for p in (1, 2)]
    assert metrics[0]["val"]["loss"] == pytest.approx(metrics[1]["val"]["loss"], abs=1e-4)


@pytest.mark.slow
def test_two_ranks_with_expert_parallelism_two(two_rank_runs):
    run, output = two_rank_runs[2]["run"], two_rank_runs[2]["output"]
    saved = load_state(run, "stage2-residual-end")
    assert {k.split(".")[4] for k in saved if k.startswith("moe.deepspeed_moe.")} == {"0", "1", "2", "3"}
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert metrics["val"]["images"] == 24  # every validation image counted once across the two ranks
    assert "CPU accelerator" in output


EPOCH_STAGES = {"stages": [{"name": "warmup", "epochs": 1}, {"name": "routing", "epochs": 1},
                           {"name": "residual", "epochs": 1}], "num_clusters": 2}


def epoch_events(run: Path) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "epoch"]


def train_two_ranks_on(dataset: Path, tmp_path: Path, **changes) -> tuple[Path, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_tiny_config(tmp_path / "ds.json", **{"curriculum": EPOCH_STAGES, "data": {"num_workers": 1}, **changes})
    run = tmp_path / "run"
    result = succeeded(launch_training(config, dataset, run, ranks=2, timeout=300))
    return run, result.stdout + result.stderr


@pytest.mark.slow
def test_two_ranks_with_sqrt_balance_on_a_long_tailed_set(tiny_dataset, tmp_path):
    run, output = train_two_ranks_on(tiny_dataset, tmp_path, data={"num_workers": 1, "balance": "sqrt"})
    epochs = epoch_events(run)
    assert [e["stage"] for e in epochs] == ["warmup", "routing", "residual"]
    for event in epochs:
        # len() is exact under re-balancing: no rank planned a batch it did not have
        assert event["ran_out_per_rank"] == [False, False], event
        assert event["batches"] == min(event["planned_batches_per_rank"]) and event["skipped_per_rank"] == [0, 0]
    for rank in (0, 1):
        assert f"rank {rank}: stage warmup epoch 0: trained on {epochs[0]['batches']} batch(es)" in output
    assert (run / "final_metrics.json").is_file()


@pytest.mark.slow
def test_two_ranks_with_a_damaged_image_in_one_ranks_shard(tmp_path):
    # 98 training images in two shards of 49, one per rank; one image of rank 0's shard (2%) is
    # damaged: rank 0 has 48 images, 6 batches of 8, where the manifest promised 7.
    dataset = write_small_set(tmp_path / "data", "damaged", {"train": 98, "val": 16, "test": 8}, shard_size=49,
                              corrupt=(10,))
    run, output = train_two_ranks_on(dataset, tmp_path / "job")
    epochs = epoch_events(run)
    images = [e for e in epochs if e["stage"] in ("warmup", "routing")]  # stages that read images
    for event in images:
        assert event["planned_batches_per_rank"] == [7, 7] and event["batches"] == 6, event
        assert event["ran_out_per_rank"] == [True, False] and event["skipped_per_rank"] == [1, 0], event
    assert "rank 0: stage warmup epoch 0: trained on 6 batch(es) of 7 planned (it ran out of batches); " \
           "1 sample(s) skipped" in output
    assert "rank 1: stage warmup epoch 0: trained on 6 batch(es) of 7 planned (the epoch ended on every rank)" in output
    assert json.loads((run / "final_metrics.json").read_text())["test"]["images"] == 8


@pytest.mark.slow
def test_two_ranks_with_uneven_shard_counts(tmp_path):
    # Three training shards of 24 for two ranks: rank 0 reads two (6 batches), rank 1 one (3).
    dataset = write_small_set(tmp_path / "data", "uneven", {"train": 72, "val": 16}, shard_size=24)
    run, _ = train_two_ranks_on(dataset, tmp_path / "job")
    for event in epoch_events(run):
        assert event["planned_batches_per_rank"] == [6, 3] and event["batches"] == 3, event
        assert event["ran_out_per_rank"] == [False, False]
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert metrics["val"]["images"] == 16 and metrics["test"] is None  # the set has no test split


@pytest.mark.slow
def test_an_expert_parallel_size_the_world_cannot_hold_fails_in_one_line_on_every_rank(tiny_dataset, tmp_path):
    config = write_tiny_config(tmp_path / "ds.json", moe={"expert_parallel_size": 4})
    started = time.time()
    result = launch_training(config, tiny_dataset, tmp_path / "run", ranks=2, timeout=120)
    assert result.returncode != 0 and time.time() - started < 120
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error: " in line]
    expected = f"error: {config}: mgmoe.moe.expert_parallel_size = 4 does not divide the number of ranks (2)"
    # Each rank refuses before any process group exists (none waits in a collective); DeepSpeed's
    # launcher stops the other rank as soon as one exits, so one or two ranks get to print.
    assert 1 <= len(errors) <= 2 and all(expected in line for line in errors), errors
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_four_ranks_with_expert_parallelism_four_and_zero1(tiny_dataset, tmp_path):
    config = write_tiny_config(tmp_path / "ds.json", moe={"expert_parallel_size": 4},
                               curriculum={"stages": [{"name": "warmup", "steps": 2}, {"name": "routing", "steps": 2},
                                                      {"name": "residual", "steps": 2}], "num_clusters": 2})
    ds = json.loads(config.read_text())
    ds["zero_optimization"] = {"stage": 1}
    config.write_text(json.dumps(ds))
    run = tmp_path / "run"
    launcher = [DEEPSPEED, "--num_gpus", "4", "--master_port", str(free_port())]
    checked(run_job(["--deepspeed", str(config), "--data", str(tiny_dataset), "--output", str(run)], launcher=launcher))
    saved = load_state(run, "stage2-residual-end")
    assert {k.split(".")[4] for k in saved if k.startswith("moe.deepspeed_moe.")} == {"0", "1", "2", "3"}
    assert json.loads((run / "config.json").read_text())["world_size"] == 4
    assert json.loads((run / "final_metrics.json").read_text())["val"]["images"] == 24


@pytest.mark.slow
def test_two_simulated_nodes_on_loopback_with_replicated_experts(tiny_dataset, tmp_path):
    # P = 1 on two ranks: every expert is replicated, its gradients reduced over DeepSpeed's
    # expert-data-parallel group (degree 2) across the two "nodes".
    config = write_tiny_config(tmp_path / "ds.json", moe={"expert_parallel_size": 1},
                               curriculum={"stages": [{"name": "warmup", "steps": 2}, {"name": "routing", "steps": 2}],
                                           "num_clusters": 2})
    run = tmp_path / "run"
    port = str(free_port())
    hostfile = tmp_path / "hostfile"  # two "nodes" on this machine, one rank each
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    args = ["--deepspeed", str(config), "--data", str(tiny_dataset), "--output", str(run)]
    nodes = []
    for node_rank in (0, 1):
        launcher = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank",
                    str(node_rank), "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", port]
        nodes.append(subprocess.Popen(launcher + [str(ROOT / "jobs" / "train.py")] + args, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [n.communicate(timeout=420)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    config_json = json.loads((run / "config.json").read_text())
    assert config_json["world_size"] == 2
    assert (run / "final_metrics.json").is_file()


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_accelerate_config(tiny_dataset, tmp_path):
    config = write_tiny_config(tmp_path / "ds.json", moe={"expert_parallel_size": 2},
                               curriculum={"stages": [{"name": "warmup", "steps": 2}], "num_clusters": 2})
    shipped = (ROOT / "jobs" / "accelerate_config.yaml").read_text()
    assert "deepspeed_config_file: ds_configs/zero2.json" in shipped
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(shipped.replace("ds_configs/zero2.json", str(config))
                                 .replace("main_process_port: 29500", f"main_process_port: {free_port()}"))
    run = tmp_path / "run"
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(accelerate_config)]
    checked(run_job(["--deepspeed", str(config), "--data", str(tiny_dataset), "--output", str(run)], launcher=launcher))
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert (run / "final_metrics.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--set", "moe.top_kk=1"], "unknown key mgmoe.moe.top_kk"),
    (["--set", "moe.top_k=9"], "mgmoe.moe.top_k = 9"),
])
def test_bad_overrides_fail_in_one_line(tmp_path, args, message):
    config = write_tiny_config(tmp_path / "ds.json")
    result = run_job(["--deepspeed", str(config)] + args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_malformed_mgmoe_block_fails_in_one_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "mgmoe": {"moe": {"capacity_factor": "big"}}}))
    result = run_job(["--deepspeed", str(path)], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: mgmoe.moe.capacity_factor = 'big': expected number"


@pytest.mark.slow
def test_non_finite_losses_skip_steps_then_stop_with_the_last_good_checkpoint(tiny_dataset, tmp_path):
    # Stage 2's absurd learning rate blows the weights up after one step; every later loss is
    # non-finite, so steps are skipped and, after max_bad_steps in a row, the run stops.
    stages = [{"name": "warmup", "steps": 2},
              {"name": "routing", "steps": 20, "lr": {"backbone": 1e30, "router": 1e30, "experts": 1e30}}]
    config = write_tiny_config(tmp_path / "ds.json", curriculum={"stages": stages, "num_clusters": 2},
                               train={"seed": 0, "log_every": 1, "max_bad_steps": 3})
    run = tmp_path / "run"
    result = run_job(["--deepspeed", str(config), "--data", str(tiny_dataset), "--output", str(run)])
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line[line.index("error: "):] for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("error: 3 non-finite losses in a row") and "stage0-warmup-end" in errors[0], errors
    assert json.loads((run / "checkpoints" / "last_good.json").read_text())["tag"] == "stage0-warmup-end"
    state = load_state(run, "stage0-warmup-end")
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    skipped = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if '"non_finite_loss"' in line]
    assert len(skipped) == 3


def test_a_world_of_one_retries_when_its_free_port_is_taken(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, socket, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import mgmoe_ds.train.distributed as engine\n"
        "busy = socket.socket(); busy.bind(('127.0.0.1', 0)); busy.listen()\n"
        "ports = iter([busy.getsockname()[1]])\n"
        "real = engine._free_port\n"
        "engine._free_port = lambda: next(ports, None) or real()\n"
        "info = engine.setup_distributed()\n"
        "print('world', info.world_size, 'port_changed', os.environ['MASTER_PORT'] != str(busy.getsockname()[1]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert "world 1 port_changed True" in result.stdout, result.stderr[-2000:]
