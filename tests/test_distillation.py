"""Teacher distillation: the distilled target and its cosine term against hand-computed cases, the
teacher's stored predictions, the step's losses with a teacher, and a job distilling from a run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import INFERENCE_STAGES, TINY_MGMOE, launch_training, succeeded, write_tiny_config
from mgmoe_ds.config import ConfigError, StageConfig, config_from_dict
from mgmoe_ds.distillation import (TeacherError, TeacherPredictions, cosine_loss, distilled_targets,
                                   load_predictions, mixed_like)
from mgmoe_ds.train.mixing import soft_targets


def test_the_distilled_target_is_the_smoothed_label_and_the_teacher_in_their_shares():
    teacher = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    target = distilled_targets(torch.tensor([2]), teacher, weight=0.6, smoothing=0.1)
    # smoothed one-hot of class 2 over 4 classes: 0.9 * onehot + 0.1 / 4 = [0.025, 0.025, 0.925, 0.025]
    # 0.6 * that + 0.4 * teacher, by hand:
    torch.testing.assert_close(target, torch.tensor([[0.055, 0.095, 0.675, 0.175]]))
    torch.testing.assert_close(target.sum(dim=1), torch.ones(1))
    # weight 1 without smoothing: the label alone; weight 0: the teacher alone
    torch.testing.assert_close(distilled_targets(torch.tensor([2]), teacher, weight=1.0, smoothing=0.0),
                               torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(distilled_targets(torch.tensor([2]), teacher, weight=0.0, smoothing=0.1), teacher)


def test_a_mixed_batch_mixes_the_teacher_with_the_same_lam_and_pairing():
    labels = torch.tensor([0, 1])
    teacher = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]])
    mixed_labels = soft_targets(labels, 3, 0.75)  # image 0 with image 1 (the flipped batch), 3/4 each own
    target = distilled_targets(mixed_labels, mixed_like(teacher, 0.75), weight=0.5, smoothing=0.0)
    # image 0: label part [0.75, 0.25, 0], teacher part 0.75 * [0.5, 0.5, 0] + 0.25 * [0, 0.2, 0.8] = [0.375, 0.425, 0.2]
    # image 1: label part [0.25, 0.75, 0], teacher part 0.75 * [0, 0.2, 0.8] + 0.25 * [0.5, 0.5, 0] = [0.125, 0.275, 0.6]
    expected = torch.tensor([[0.5625, 0.3375, 0.1], [0.1875, 0.5125, 0.3]])
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(2))
    assert mixed_like(teacher, None) is teacher


def test_the_cosine_term_by_hand():
    uniform = torch.zeros(1, 4)  # softmax = [1/4] * 4; against a one-hot: cos = (1/4) / (1/2 * 1) = 1/2
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(cosine_loss(uniform, one_hot), torch.tensor(0.5))
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))  # its softmax is the target itself: loss 0
    torch.testing.assert_close(cosine_loss(logits, torch.tensor([[0.2, 0.3, 0.5]])), torch.tensor(0.0))
    # a batch is the mean of its images' terms
    both = cosine_loss(torch.cat([torch.zeros(1, 3), logits]), torch.tensor([[1.0, 0, 0], [0.2, 0.3, 0.5]]))
    torch.testing.assert_close(both, torch.tensor((1 - (1 / 3) / math.sqrt(1 / 3)) / 2))
    empty = torch.zeros(0, 3, requires_grad=True)
    assert cosine_loss(empty, torch.zeros(0, 3)).item() == 0.0


def stored_predictions():
    three = math.log(3.0)
    logits = torch.tensor([  # (V=2, N=3, C=2)
        [[0.0, three], [three, 0.0], [0.0, 0.0]],  # view 0: [1/4, 3/4], [3/4, 1/4], [1/2, 1/2]
        [[0.0, 0.0], [three, 0.0], [0.0, 2 * three]],  # view 1: [1/2, 1/2], [3/4, 1/4], [1/10, 9/10]
    ])
    return TeacherPredictions("k" * 64, logits, ["a", "b", "c"])


def test_stored_predictions_are_looked_up_by_key_and_view_or_averaged_over_views(tmp_path):
    predictions = stored_predictions()
    torch.testing.assert_close(predictions.probs(["c", "a"], torch.tensor([1, 0])),
                               torch.tensor([[0.1, 0.9], [0.25, 0.75]]))
    torch.testing.assert_close(predictions.probs(["a", "c"]), torch.tensor([[0.375, 0.625], [0.3, 0.7]]))
    # temperature 2 halves the logits: view 1 of "c" becomes [1/4, 3/4]
    torch.testing.assert_close(predictions.probs(["c"], torch.tensor([1]), temperature=2.0), torch.tensor([[0.25, 0.75]]))
    with pytest.raises(TeacherError, match="no prediction for sample 'zebra'"):
        predictions.probs(["a", "zebra"])
    # stored and read back (memory-mapped), the same answers; a folder without its index is unfinished
    loaded = predictions.save(tmp_path / "teacher")
    assert loaded.key == predictions.key and loaded.keys == ["a", "b", "c"]
    torch.testing.assert_close(loaded.probs(["c", "a"], torch.tensor([1, 0])), torch.tensor([[0.1, 0.9], [0.25, 0.75]]))
    (tmp_path / "teacher" / "index.json").unlink()
    assert load_predictions(tmp_path / "teacher") is None


@pytest.mark.parametrize("changes, key", [
    ({"weight": 1.5}, "mgmoe.distill.weight"),
    ({"label_smoothing": 1.0}, "mgmoe.distill.label_smoothing"),
    ({"temperature": 0}, "mgmoe.distill.temperature"),
    ({"img_size": 64}, "mgmoe.distill.img_size"),  # only for a timm teacher
    ({"teacher": ""}, "mgmoe.distill.teacher"),
])
def test_bad_distill_settings_are_one_line_naming_the_key(changes, key):
    block = dict(TINY_MGMOE, distill={"teacher": "runs/last_year", **changes})
    with pytest.raises(ConfigError) as err:
        config_from_dict(block, "ds.json")
    assert key.removeprefix("mgmoe.") in str(err.value) and "\n" not in str(err.value)


def test_a_step_with_a_teacher_trains_on_the_distilled_target_with_the_cosine_term(world_of_one):
    from mgmoe_ds.curriculum import create_stage
    from mgmoe_ds.model import MGMoE
    from mgmoe_ds.moe.routing import RoutingRequest
    from mgmoe_ds.train.distill import Distiller
    from mgmoe_ds.train.distributed import Collectives
    from mgmoe_ds.train.step import TrainStep, trained_groups
    from test_train_step import PlainEngine

    config = config_from_dict(dict(TINY_MGMOE, distill={"teacher": "unused", "weight": 0.7, "label_smoothing": 0.2}))
    torch.manual_seed(0)
    model = MGMoE(config.model, config.moe, 4).eval()
    reference = copy.deepcopy(model)
    stage = create_stage(StageConfig("warmup", steps=1), config, base_lr=0.1)
    distiller = Distiller(config, data=None, root=".", device=torch.device("cpu"), is_main=False)
    teacher_logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    distiller.predictions = TeacherPredictions("t" * 64, teacher_logits[None], ["x", "y", "z"])  # (V=1, N=3, C=4)
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(3, 3, 32, 32, generator=g), "labels": torch.tensor([3, 0, 1]),
             "keys": ["z", "x", "y"]}
    step = TrainStep(stage, stage.routing(None), Collectives(torch.device("cpu")), torch.device("cpu"), torch.float32,
                     config.moe, distiller=distiller)
    result = step(PlainEngine(model, trained_groups(model, stage)), batch, None)

    # the target of each image by hand: 0.7 * (0.8 * onehot + 0.05) + 0.3 * its own teacher row (by key)
    expected = torch.tensor([[0.035, 0.035, 0.035, 0.595], [0.595, 0.035, 0.035, 0.035],
                             [0.035, 0.595, 0.035, 0.035]])
    expected += 0.3 * torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    out = reference(batch["images"], expected, routing=RoutingRequest.dense(uniform_weights=True))
    soft_ce = -(expected * torch.log_softmax(out.logits, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(result.losses["task"], soft_ce.detach())
    probs = torch.softmax(out.logits, dim=1)
    cos = (probs * expected).sum(dim=1) / (probs.norm(dim=1) * expected.norm(dim=1))
    torch.testing.assert_close(result.losses["distill.cosine"], (1 - cos).mean().detach())


# ---------------------------------------------------------------------------------------------
# With a real teacher: a trained run of this product


@pytest.mark.slow
def test_the_teachers_predictions_are_its_inference_on_each_training_image_computed_once(trained_run, tiny_dataset,
                                                                                        tmp_path):
    from mgmoe_ds.data import make_loader
    from mgmoe_ds.inference import load_trained, routed_forward
    from mgmoe_ds.train.data import RunData
    from mgmoe_ds.train.distill import Distiller

    config = config_from_dict(dict(TINY_MGMOE, distill={"teacher": str(trained_run)}, data={"num_workers": 0}))
    data = RunData(config, str(tiny_dataset), rank=0, world_size=1, micro_batch=8, pin_memory=False,
                   transform_options={})
    distiller = Distiller(config, data, tmp_path / "cache", device=torch.device("cpu"), is_main=False)
    predictions = distiller.prepare()
    assert not distiller.reused and predictions.num_views == 1 and len(predictions.keys) == 96

    # the reference: the teacher loaded for inference, on the training images through its eval transform
    model, meta = load_trained(trained_run)
    loader, _ = make_loader(tiny_dataset, "train", batch_size=16, img_size=meta.preprocessing.img_size, train=False,
                            shuffle=False, transform_options=meta.preprocessing.transform_options())
    for batch in loader:
        expected = torch.softmax(routed_forward(model, meta, batch["images"]).logits, dim=1)
        torch.testing.assert_close(predictions.probs(batch["keys"]), expected, atol=1e-5, rtol=1e-4)

    again = Distiller(config, data, tmp_path / "cache", device=torch.device("cpu"), is_main=False)
    again.prepare()
    assert again.reused, "the second run finds the stored predictions"


@pytest.mark.slow
def test_a_job_distils_from_last_runs_model_and_logs_the_cosine_term(trained_run, tiny_dataset, tmp_path):
    config = write_tiny_config(tmp_path / "ds.json", curriculum=INFERENCE_STAGES,
                               distill={"teacher": str(trained_run), "weight": 0.5},
                               train={"log_every": 1})
    result = succeeded(launch_training(config, tiny_dataset, tmp_path / "run"))
    assert "distill: teacher" in result.stdout + result.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "distill.cosine" in json.dumps(line)]
    assert logged, "distill.cosine is logged"
    assert list((tmp_path / "run" / "feature_cache").glob("teacher-*/index.json"))
    # a config naming a teacher that is not there fails in one line naming it
    missing = write_tiny_config(tmp_path / "bad.json", curriculum=INFERENCE_STAGES,
                                distill={"teacher": str(tmp_path / "no_such_run")})
    failed = launch_training(missing, tiny_dataset, tmp_path / "bad_run")
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: mgmoe.distill.teacher") and "no_such_run" in last, failed.stderr[-2000:]
