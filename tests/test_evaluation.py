"""The evaluation package: metrics on hand-made logits, and ``eval`` and ``ablate`` on a trained tiny run."""

from __future__ import annotations

import json

import pytest
import torch


def test_long_tail_buckets_and_confused_pairs():
    from mgmoe_ds.evaluation import confused_pairs, long_tail_buckets

    buckets, thresholds = long_tail_buckets([100, 50, 10, 2, 60, 5], head_min=50, tail_max=5)
    assert buckets == ["head", "head", "medium", "tail", "head", "tail"]
    assert thresholds == {"head_min": 50.0, "tail_max": 5.0, "balanced": False}
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([1, 1, 0, 1, 0, 2]), 3).float()
    pairs = confused_pairs(logits, labels, ["a", "b", "c"])
    assert pairs[0] == {"true": "a", "predicted": "b", "count": 2, "rate": 2 / 3}
    assert pairs[1]["true"] == "b" and pairs[1]["predicted"] == "a" and len(pairs) == 2


# ---------------------------------------------------------------------------------------------
# On a trained tiny run (the ``trained_run`` and ``eval_report`` fixtures in conftest.py)


@pytest.mark.slow
def test_eval_report_has_every_section_and_figure(eval_report):
    report = json.loads((eval_report / "report.json").read_text())
    acc, eff, routing = report["accuracy"], report["efficiency"], report["routing"]
    assert report["images"] == 16 and report["final_stage"] == "residual"
    assert report["routing_policy"]["kind"] == "cluster"
    assert 0 <= acc["top1"] <= acc["top5"] <= 1
    assert len(acc["per_class"]) == 4 and {"species", "train_images", "bucket", "top1"} <= set(acc["per_class"][0])
    assert set(acc["long_tail"]["buckets"]) == {"head", "medium", "tail"}
    assert {"head_min", "tail_max"} <= set(acc["long_tail"]["thresholds"])
    assert isinstance(acc["confused_pairs"], list)
    assert eff["flops_per_image"]["dense"] > eff["flops_per_image"]["top_k"] > eff["flops_per_image"]["backbone"] > 0
    assert eff["parameters"]["total"] > eff["parameters"]["active_per_image"] > 0 and eff["images_per_s"] > 0
    assert len(routing["utilisation"]) == 4 and abs(routing["experts_per_image"] - 2) < 1e-6
    variants = report["variants"]
    assert {"routed", "dense"} <= set(variants) and sum(k.startswith("expert ") for k in variants) == 4
    assert all({"top1", "top5", "buckets", "flops_per_image"} <= set(v) for v in variants.values())
    assert set(report["routed_beats"]) == {"dense", "best_single_expert"}
    for figure in ("routing_heatmap.png", "tsne.png"):
        assert (eval_report / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (eval_report / "report.md").read_text()
    assert "## Accuracy" in markdown and "| dense |" in markdown and "routing_heatmap.png" in markdown


@pytest.mark.slow
def test_ablate_has_a_row_per_k_and_per_subset(trained_run, eval_report, tiny_dataset, tmp_path):
    from mgmoe_ds.cli import main

    assert main(["ablate", "--checkpoint", str(trained_run), "--data", str(tiny_dataset), "--out", str(tmp_path),
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "ablation.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert [r["k"] for r in report["rows"] if r["kind"] == "top_k"] == [1, 2, 3, 4]
    subsets = [r for r in report["rows"] if r["kind"] == "subset"]
    assert len(subsets) == 4 + 6 + 4 + 1 and all(len(r["experts"]) == r["k"] >= 1 for r in subsets)
    alone = {r["experts"][0]: r["top1"] for r in subsets if r["k"] == 1}
    report_rows = json.loads((eval_report / "report.json").read_text())["variants"]
    for e, name in enumerate(("mpsa", "pmg", "transfg", "pim")):  # a subset of one is the expert alone
        assert alone[name] == report_rows[f"expert {e}:{name}"]["top1"]
    assert report["verdict"] and "fixed subset" in report["verdict"][0]
    for k, bound in report["oracle_top1"].items():  # the oracle can pick any subset of k: never below one
        assert bound >= max(r["top1"] for r in subsets if r["k"] == int(k))
    assert report["verdict"][-1].startswith("Headroom: an oracle picking, per image, a fixed subset of")
    assert rows["top-1"]["flops_per_image"] < rows["top-2"]["flops_per_image"] < rows["top-4"]["flops_per_image"]
    assert all(0 <= r["top1"] <= 1 and abs(r["experts_per_image"] - r["k"]) < 1e-6 for r in subsets)
    # all four experts fused with router weights is dense fusion: the same as top-4
    assert rows["{mpsa+pmg+transfg+pim} k=4"]["top1"] == rows["top-4"]["top1"]
    assert "| top-2 |" in (tmp_path / "ablation.md").read_text()


def test_long_tail_buckets_survive_ties_and_say_when_a_set_is_balanced():
    from mgmoe_ds.evaluation import long_tail_buckets

    # 100 classes with counts 26..30, most at 30 (as a CUB subset): the tertiles tie at 30, and the
    # plain rule (tail <= 30) would put every class in the tail
    counts = [26] * 10 + [27] * 10 + [28] * 10 + [29] * 10 + [30] * 60
    buckets, thresholds = long_tail_buckets(counts)
    assert {b: buckets.count(b) for b in set(buckets)} == {"tail": 20, "medium": 20, "head": 60}
    assert (thresholds["tail_max"], thresholds["head_min"]) == (27.0, 30.0) and not thresholds["balanced"]
    balanced, thresholds = long_tail_buckets([25] * 12)
    assert balanced == ["all"] * 12 and thresholds["balanced"]
    two_values, _ = long_tail_buckets([5, 5, 5, 9])  # ties at both tertiles: the head keeps the 9
    assert two_values == ["tail", "tail", "tail", "head"]


def test_calibration_and_nll_on_a_hand_made_case():
    import math

    from mgmoe_ds.evaluation import accuracy_summary
    from mgmoe_ds.evaluation.metrics import expected_calibration_error

    # two images, each predicted with probability 0.8 (logits log 4, 0): one right, one wrong.
    logits = torch.tensor([[math.log(4.0), 0.0], [math.log(4.0), 0.0]])
    labels = torch.tensor([0, 1])
    # one confidence bin (0.8): accuracy 0.5, confidence 0.8 -> ECE 0.3
    assert expected_calibration_error(logits, labels) == pytest.approx(0.3)
    summary = accuracy_summary(logits, labels, ["all", "all"])
    assert summary["nll"] == pytest.approx((-math.log(0.8) - math.log(0.2)) / 2)
    assert summary["ece"] == pytest.approx(0.3) and set(summary["buckets"]) == {"all"}


def test_the_ablation_says_in_words_whether_the_router_beats_the_fixed_subsets():
    from mgmoe_ds.ablate import verdict

    def row(kind, top1, k, experts=None, per_image=None):
        return {"kind": kind, "top1": top1, "k": k, "experts": experts, "experts_per_image": per_image or k}

    rows = [row("trained", 0.90, None, per_image=2.0), row("top_k", 0.86, 2),
            row("subset", 0.85, 2, ["a", "b"]), row("subset", 0.80, 2, ["a", "c"]), row("subset", 0.70, 3, ["a", "b", "c"])]
    lines = verdict(rows, images=400)  # SE at 0.85 on 400 images: 1.79 points
    assert lines[0].startswith("The trained routing (about 2 expert(s) per image) (90.00%) beats the best fixed "
                               "subset of 2, {a+b} (85.00%) by 5.00 points, more than one standard error (1.79)")
    assert lines[1].startswith("The router's free Top-2 (86.00%) ties the best fixed subset of 2")
    assert lines[2] == "The trained routing beats 2 of the 2 fixed subsets of 2."


def test_the_oracle_headroom_counts_an_image_right_when_any_fixed_subset_of_that_size_is():
    from types import SimpleNamespace

    from mgmoe_ds.ablate import oracle_top1, verdict

    labels = torch.tensor([0, 1, 0, 1])

    def predicting(*classes):  # logits whose argmax is the given class per image
        return SimpleNamespace(logits=torch.nn.functional.one_hot(torch.tensor(classes), 2).float())

    passes = {"{a} k=1": predicting(0, 0, 0, 0), "{b} k=1": predicting(0, 1, 0, 0),  # right on {0,2}, {0,1,2}
              "{a+b} k=2": predicting(0, 1, 1, 0), "{a+c} k=2": predicting(1, 1, 1, 0),  # right on {0,1}, {1}
              "{a+b} k=1": predicting(1, 1, 1, 1)}  # subset_k < size: not a fixed subset of 1, not counted
    rows = [({"row": name, "kind": "subset", "k": int(name[-1]), "experts": name[1:name.index("}")].split("+")}, None)
            for name in passes]
    oracle = oracle_top1(rows, SimpleNamespace(labels=labels, passes=passes))
    assert oracle == {1: 0.75, 2: 0.5}  # k=1: images 0, 1, 2; k=2: images 0 and 1
    table = [{"kind": "trained", "top1": 0.5, "k": None, "experts": None, "experts_per_image": 2.0},
             {"kind": "subset", "top1": 0.5, "k": 2, "experts": ["a", "b"], "experts_per_image": 2.0}]
    assert verdict(table, 4, oracle)[-1] == ("Headroom: an oracle picking, per image, a fixed subset of 2 that is "
                                             "right would reach 50.00% (+0.00 points on the best fixed subset).")


def test_bucket_top1_pools_the_images_of_each_buckets_classes():
    from mgmoe_ds.evaluation.metrics import bucket_top1

    images = torch.tensor([10.0, 4.0, 6.0, 0.0])
    correct = torch.tensor([9.0, 1.0, 3.0, 0.0])
    by_bucket = bucket_top1(images, correct, ["head", "tail", "tail", "medium"])
    # tail: (1 + 3) / (4 + 6) = 0.4 pooled over images (the mean of per-class rates would be 0.375)
    assert by_bucket == {"head": {"classes": 1, "images": 10, "top1": 0.9},
                         "medium": {"classes": 1, "images": 0, "top1": None},
                         "tail": {"classes": 2, "images": 10, "top1": 0.4}}
