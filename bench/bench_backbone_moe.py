"""Issue 16 benchmark: token-level MoE blocks in the backbone, soft vs hard vs both vs none, same budget.

On flowers12 (or its data-limited variant, ``--train-per-class N``), the product's training job
with ``ds_configs/cpu_small.json`` as shipped (offline Lite0 at 224 px, feature cache after block
3, the blocks above it training), four arms that differ only in ``model.backbone_moe``:

* none: no MoE block;
* soft: blocks ``--blocks`` (default two of Lite0's stage-5 blocks, above the cut) become MoE
  blocks of ``--experts`` upcycled experts, Top-2 per token, with the soft constraint (importance
  and load losses, weights 0.01 each);
* hard: the same blocks with the hard constraint alone (``--threshold``: an expert whose running
  gate share exceeds it is masked; evaluated with the mask training ended with, the product's
  default, and, for comparison, with every expert back);
* both: soft and hard.

Every arm trains for the config's epochs, reading one shared feature cache, and is evaluated on
the test split with ``mgmoe eval``: top-1 with its binomial standard error, and per MoE block the
utilisation spread (max/min and coefficient of variation of the experts' shares) and the
class-expert entropy (normalised: 1 = every class spread evenly over the experts) and mutual
information. The two claims to test: "soft specialises more" (lower class-expert entropy, higher
mutual information than hard) and "hard scores higher" (top-1 above soft by more than one SE).

Usage::

    PYTHONPATH=. python bench/bench_backbone_moe.py --train-per-class 15   # ~30 min on 2 cores
    PYTHONPATH=. python bench/bench_backbone_moe.py                        # full flowers12

Writes ``bench/results/backbone_moe[_<N>pc].json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_real_data import DEFAULT_DATA, ROOT, binomial_se, carve_validation, cli, train_job
from machine import cpu_name

ARMS = ("none", "soft", "hard", "both")


def arm_overrides(arm: str, args) -> list[str]:
    if arm == "none":
        return []
    constraint = {"soft": {} if arm in ("soft", "both") else None,
                  "hard": {"threshold": args.threshold} if arm in ("hard", "both") else None}
    block = {"blocks": args.blocks, "num_experts": args.experts, "top_k": 2, "constraint": constraint}
    return [f"model.backbone_moe={json.dumps(block)}"]


def block_statistics(report: dict) -> dict:
    """Per MoE block: utilisation spread, class-expert entropy and mutual information."""
    rows = {}
    for name, layer in report.get("backbone_moe", {}).items():
        spread = layer["utilisation_spread"]
        rows[name] = {"utilisation": layer["utilisation"], "max_over_min": spread["max_over_min"],
                      "utilisation_cv": spread["coefficient_of_variation"],
                      "entropy": layer["class_expert_entropy"]["normalised"],
                      "mutual_information": layer["mutual_information"],
                      "summary": layer["summary"], "switch_off": layer.get("switch_off_summary", [])}
    return rows


def hard_mask_comparison(run_dir: Path, dataset: Path) -> dict:
    """Test top-1 of a hard-constraint run evaluated with the mask training ended with (the
    product's default, ``constraint.hard.at_eval``) and with every expert back; the masked experts
    and running shares by block."""
    import torch

    from mgmoe_ds.evaluation.loading import eval_loader
    from mgmoe_ds.inference import load_trained, routed_forward

    model, meta = load_trained(run_dir)
    loader, _, _ = eval_loader(meta, str(dataset), "test", 32)
    layers = model.token_moe_layers()
    result = {"masked": {name: torch.nonzero(~layer.allowed_experts()).flatten().tolist() for name, layer in layers.items()},
              "gate_share": {name: [round(v, 4) for v in layer.gate_share.tolist()] for name, layer in layers.items()}}
    for label, at_eval in (("top1_masked", True), ("top1_every_expert", False)):
        for layer in layers.values():
            layer.hard_at_eval = at_eval
        correct = total = 0
        for batch in loader:
            logits = routed_forward(model, meta, batch["images"].float()).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += int(batch["labels"].numel())
        result[label] = correct / max(total, 1)
    return result


def paired_comparisons(eval_root: Path, arms: list[str]) -> dict:
    """Every pair of arms on the same test photos (their ``mgmoe eval`` predictions): the top-1
    difference with its paired standard error (``evaluation.boxes.paired_comparison``)."""
    import torch

    from mgmoe_ds.evaluation.boxes import paired_comparison

    correct = {}
    for arm in arms:
        rows = [json.loads(line) for line in (eval_root / arm / "predictions.jsonl").read_text().splitlines()]
        correct[arm] = {row["key"]: row["label"] == row["predicted"] for row in rows}
    keys = sorted(correct[arms[0]])
    pairs = {}
    for i, this in enumerate(arms):
        for other in arms[i + 1:]:
            pairs[f"{this} vs {other}"] = paired_comparison(torch.tensor([correct[this][k] for k in keys]),
                                                            torch.tensor([correct[other][k] for k in keys]))
    return pairs


def render_pairs(pairs: dict) -> str:
    lines = ["| pair | difference (points) | paired SE | photos only the first / only the second gets right | |",
             "|---|---:|---:|---:|---|"]
    for name, c in pairs.items():
        lines.append(f"| {name} | {100 * c['difference']:+.1f} | {100 * c['standard_error']:.1f} | "
                     f"{c['only_this_right']} / {c['only_other_right']} | {'tie' if c['tie'] else 'beyond one SE'} |")
    return "\n".join(lines)


def render(results: dict) -> str:
    lines = ["| arm | test top-1 ± SE | vs none (points) | block | utilisation max/min | utilisation CV | "
             "class-expert entropy | mutual information (nats) | minutes |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    base = results["arms"].get("none")
    n = results["splits"]["test"]
    for arm, r in results["arms"].items():
        se = binomial_se(r["test_top1"], n)
        delta = "-"
        if base is not None and arm != "none":
            diff_se = (se ** 2 + binomial_se(base["test_top1"], n) ** 2) ** 0.5
            gain = r["test_top1"] - base["test_top1"]
            delta = f"{100 * gain:+.1f}" + (" (tie)" if abs(gain) <= diff_se else "")
        blocks = r.get("blocks") or {"-": None}
        for i, (name, b) in enumerate(blocks.items()):
            head = (f"| {arm} | {r['test_top1']:.3f} ± {se:.3f} | {delta} |" if i == 0 else "| | | |")
            if b is None:
                lines.append(f"{head} - | - | - | - | - | {r['seconds'] / 60:.1f} |")
                continue
            ratio = "inf" if b["max_over_min"] is None else f"{b['max_over_min']:.2f}"
            minutes = f"{r['seconds'] / 60:.1f}" if i == 0 else ""
            lines.append(f"{head} {name} | {ratio} | {b['utilisation_cv']:.2f} | {b['entropy']:.3f} | "
                         f"{b['mutual_information']:.3f} | {minutes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--config", type=Path, default=ROOT / "ds_configs" / "cpu_small.json")
    parser.add_argument("--val-per-class", type=int, default=12)
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--blocks", nargs="+", default=["blocks.5.1", "blocks.5.3"])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.25, help="the hard constraint's share threshold")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    args.set, args.pretrained = [], None  # what bench_real_data.train_job reads
    import torch

    suffix = f"_{args.train_per_class}pc" if args.train_per_class else ""
    work = args.work or ROOT / "bench" / "results" / f"backbone_moe_work{suffix}"
    shutil.rmtree(work, ignore_errors=True)
    splits = carve_validation(args.data, work / "images", args.val_per_class, args.seed, args.train_per_class)
    subprocess.run([sys.executable, "-m", "mgmoe_ds.cli", "shards", "build", str(work / "images"), "--format",
                    "imagefolder", "--name", args.data.name, "--out", str(work / "shards"), "--shard-size", "64",
                    "--no-progress"], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    dataset = work / "shards" / args.data.name
    started = time.time()
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "splits": splits,
               "config": str(args.config.relative_to(ROOT)), "blocks": args.blocks, "experts": args.experts,
               "threshold": args.threshold,
               "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__, "loadavg_start": os.getloadavg()},
               "arms": {}}
    out = ROOT / "bench" / "results" / f"backbone_moe{suffix}.json"
    for arm in args.arms:
        print(f"{arm} ...", flush=True)
        r = train_job(f"arm_{arm}", arm_overrides(arm, args), args, dataset, work)
        eval_dir = work / "eval" / arm
        cli("eval", "--checkpoint", str(work / "runs" / f"arm_{arm}"), "--data", str(dataset), "--split", "test",
            "--out", str(eval_dir), "--no-progress", log=work / "logs" / f"arm_{arm}_eval.log")
        if arm != "none":
            r["blocks"] = block_statistics(json.loads((eval_dir / "report.json").read_text()))
            if arm in ("hard", "both"):
                r["hard_mask"] = hard_mask_comparison(work / "runs" / f"arm_{arm}", dataset)
                print(f"  hard mask at eval: {json.dumps(r['hard_mask'])}", flush=True)
        results["arms"][arm] = r
        print(f"  test top-1 {r['test_top1']:.3f}, {r['seconds']:.0f} s", flush=True)
        results["machine"]["loadavg_end"] = os.getloadavg()
        results["wall_s"] = time.time() - started
        out.write_text(json.dumps(results, indent=1))
    results["paired"] = paired_comparisons(work / "eval", list(results["arms"]))
    out.write_text(json.dumps(results, indent=1))
    print()
    print(render(results))
    print()
    print(render_pairs(results["paired"]))
    for arm, r in results["arms"].items():
        if "hard_mask" in r:
            h, n = r["hard_mask"], results["splits"]["test"]
            print(f"{arm}: test top-1 with the mask training ended with {h['top1_masked']:.3f}, with every expert "
                  f"{h['top1_every_expert']:.3f} (SE {binomial_se(h['top1_masked'], n):.3f}); masked {h['masked']}")
    print(f"\nraw results in {out}")


if __name__ == "__main__":
    main()
