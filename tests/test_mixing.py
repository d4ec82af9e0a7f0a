"""Mixup and CutMix with soft targets: the batch function, the epochs it is on, the step, the model's losses."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MGMOE
from mgmoe_ds.config import ConfigError, StageConfig, config_from_dict
from mgmoe_ds.curriculum import create_stage
from mgmoe_ds.train.mixing import Mixing, mix_batch, mixing_for_epoch, stage_mixes
from mgmoe_ds.train.state import Generators
from mgmoe_ds.train.step import TrainStep

C = 5  # classes


def batch(n=6, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, C, (n,), generator=g)


def expected_targets(labels, lam):
    """lam * onehot(y) + (1 - lam) * onehot(y of the flipped batch), written out row by row."""
    rows = torch.zeros(len(labels), C)
    for i, (own, other) in enumerate(zip(labels.tolist(), reversed(labels.tolist()))):
        rows[i, own] += lam
        rows[i, other] += 1 - lam
    return rows


def test_mixup_blends_each_image_with_the_flipped_batch_and_its_targets():
    images, labels = batch()
    mixed = mix_batch(images, labels, C, np.random.RandomState(3), mixup_alpha=0.4)
    lam = np.random.RandomState(3).beta(0.4, 0.4)  # Mixup alone draws lam only
    assert mixed.box is None and mixed.lam == pytest.approx(lam)
    for i in range(len(images)):
        torch.testing.assert_close(mixed.images[i], lam * images[i] + (1 - lam) * images[len(images) - 1 - i])
    torch.testing.assert_close(mixed.targets, expected_targets(labels, lam))
    torch.testing.assert_close(mixed.targets.sum(1), torch.ones(len(images)))
    assert mixed.targets.dtype == torch.float32


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_lam_is_the_share_of_unchanged_pixels(seed):
    images, labels = batch(seed=seed)
    mixed = mix_batch(images, labels, C, np.random.RandomState(seed), cutmix_alpha=1.0)
    n, _, h, w = images.shape
    changed = (mixed.images != images).any(dim=1)  # (B, H, W): pixels that came from the partner
    for i in range(n):
        partner = images[n - 1 - i]
        # every changed pixel is the partner's; the changed pixels form one box, the same in every image
        assert torch.equal(mixed.images[i][:, changed[i]], partner[:, changed[i]])
        assert torch.equal(changed[i], changed[0])
    area = int(changed[0].sum())
    assert mixed.lam == pytest.approx(1 - area / (h * w))
    if area:
        rows, cols = changed[0].nonzero(as_tuple=True)
        y0, y1, x0, x1 = mixed.box
        assert (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1) == (y0, y1, x0, x1)
        assert area == (y1 - y0) * (x1 - x0)  # a full rectangle
    torch.testing.assert_close(mixed.targets, expected_targets(labels, mixed.lam))
    torch.testing.assert_close(mixed.targets.sum(1), torch.ones(n))


def test_with_both_on_each_batch_gets_one_of_them():
    images, labels = batch()
    rng = np.random.RandomState(0)
    kinds = [mix_batch(images, labels, C, rng, mixup_alpha=0.8, cutmix_alpha=1.0).box is None for _ in range(200)]
    assert 60 < sum(kinds) < 140  # Mixup about half the time


def test_both_alphas_zero_mix_nothing():
    images, labels = batch()
    mixed = mix_batch(images, labels, C, np.random.RandomState(0))
    assert mixed.images is images and mixed.lam == 1.0
    torch.testing.assert_close(mixed.targets, F.one_hot(labels, C).float())


def test_a_resumed_run_draws_the_same_mixing():
    """The draws come from NumPy's global generator, which the checkpoints' ``Generators`` save."""
    images, labels = batch()
    mixing = Mixing(0.8, 1.0, C)
    np.random.seed(7)
    generators = Generators(torch.device("cpu"))
    saved = generators.state_dict()
    first = [mixing(images, labels) for _ in range(4)]
    generators.load_state_dict(saved)
    again = [mixing(images, labels) for _ in range(4)]
    for a, b in zip(first, again):
        assert a.lam == b.lam and a.box == b.box and torch.equal(a.images, b.images)


# -- which epochs mix --------------------------------------------------------------------------

def config(stages=({"name": "warmup", "epochs": 2}, {"name": "routing", "epochs": 3}), **data):
    return config_from_dict(dict(TINY_MGMOE, data=data, curriculum={"stages": list(stages)}))


def test_mixing_is_off_when_the_config_says_so():
    plain = config()
    assert all(mixing_for_epoch(plain, s, e, C) is None for s in range(2) for e in range(3))
    mixed = config(mixup=0.8, cutmix=1.0, mix_off_last_epochs=2)
    on = [(s, e) for s, epochs in ((0, 2), (1, 3)) for e in range(epochs) if mixing_for_epoch(mixed, s, e, C)]
    assert on == [(0, 0), (0, 1), (1, 0)]  # the curriculum's last 2 epochs are clean
    assert mixing_for_epoch(mixed, 0, 0, C) == Mixing(0.8, 1.0, C)
    assert mixing_for_epoch(config(cutmix=1.0), 1, 2, C) == Mixing(0.0, 1.0, C)  # N = 0: every epoch mixes
    # a stage measured in steps before the clean epochs mixes throughout
    steps_first = config(({"name": "warmup", "steps": 5}, {"name": "routing", "epochs": 2}), mixup=0.2,
                         mix_off_last_epochs=2)
    assert mixing_for_epoch(steps_first, 0, 3, C) is not None and mixing_for_epoch(steps_first, 1, 0, C) is None


def test_a_stage_that_mixes_trains_from_images_not_the_feature_cache(tmp_path):
    from mgmoe_ds.train.stage_features import StageFeatures

    stages = ({"name": "warmup", "epochs": 1}, {"name": "residual", "epochs": 1}, {"name": "residual", "epochs": 1})
    run = config(stages, mixup=0.8, mix_off_last_epochs=1)
    model = SimpleNamespace(token_moe_layers=dict)
    features = StageFeatures(run, model, None, tmp_path, device=torch.device("cpu"), input_dtype=torch.float32,
                             is_main=False)
    mixing, clean = (create_stage(s, run, 1e-3) for s in run.curriculum.stages[1:])
    assert not mixing.trains_backbone and stage_mixes(run, mixing.config) and not stage_mixes(run, clean.config)
    assert "data.mixup / data.cutmix" in features.refusal(mixing)
    assert "data.mixup" not in (features.refusal(clean) or "")


def test_only_the_training_step_mixes():
    """The passes that validate and fit the clusters and the teacher (on the eval loaders) never
    reach the mixing code: neither they nor the stages import it or the step."""
    package = Path(__file__).resolve().parent.parent / "mgmoe_ds"
    importing = re.compile(r"train\.mixing import|train\.step import|import mix_batch|import Mixing")
    passes = [package / "train" / "passes.py", *(package / "curriculum").glob("*.py")]
    assert [p.name for p in passes if importing.search(p.read_text())] == []
    assert "mixing(" in (package / "train" / "step.py").read_text()


@pytest.mark.parametrize("block, message", [
    ({"mixup": -0.1}, "mgmoe.data.mixup = -0.1: expected a number >= 0"),
    ({"cutmix": -1}, "mgmoe.data.cutmix = -1.0: expected a number >= 0"),
    ({"mixup": 1, "mix_off_last_epochs": -1}, "mgmoe.data.mix_off_last_epochs = -1: expected an integer >= 0"),
    ({"mixup": 1, "mix_off_last_epochs": 5}, "mgmoe.data.mix_off_last_epochs = 5: expected fewer than the "
                                             "curriculum's 5 epochs"),
])
def test_bad_mixing_values_fail_in_one_line(block, message):
    with pytest.raises(ConfigError) as err:
        config(**block)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_clean_epochs_may_not_count_a_stage_measured_in_steps():
    stages = ({"name": "warmup", "epochs": 2}, {"name": "routing", "steps": 100}, {"name": "residual", "epochs": 1})
    with pytest.raises(ConfigError) as err:
        config(stages, cutmix=1.0, mix_off_last_epochs=2)
    assert ("mgmoe.data.mix_off_last_epochs = 2: expected at most 1, the epochs after curriculum.stages[1], which "
            "is measured in steps" in str(err.value)) and "\n" not in str(err.value)
    assert config(stages, cutmix=1.0, mix_off_last_epochs=1).data.mix_off_last_epochs == 1
    assert config(stages, mix_off_last_epochs=2).data.mixup == 0  # mixing off: nothing to count


# -- the model's soft-target losses and the step -----------------------------------------------

@pytest.fixture(scope="module")
def model():
    from mgmoe_ds.model import MGMoE

    run = config_from_dict(TINY_MGMOE)
    torch.manual_seed(0)
    return MGMoE(run.model, run.moe, C).eval()  # eval: no random draws in the experts


def test_one_hot_soft_targets_give_the_hard_labels_losses(model):
    images, labels = batch()
    with torch.no_grad():
        hard = model(images, labels)
        soft = model(images, F.one_hot(labels, C).float())
    assert set(hard.losses) == set(soft.losses) and {"task", "fallback", "moe.pmg.standalone"} <= set(hard.losses)
    for name, value in hard.losses.items():
        torch.testing.assert_close(soft.losses[name], value, msg=name)


def test_mixed_targets_weight_the_two_labels_cross_entropies(model):
    images, labels = batch()
    mixed = mix_batch(images, labels, C, np.random.RandomState(1), mixup_alpha=1.0)
    with torch.no_grad():
        out = model(mixed.images, mixed.targets)
    log_p = out.logits.float().log_softmax(-1)  # (B, C)
    own, other = log_p.gather(1, labels[:, None])[:, 0], log_p.gather(1, labels.flip(0)[:, None])[:, 0]
    torch.testing.assert_close(out.losses["task"], -(mixed.lam * own + (1 - mixed.lam) * other).mean())


class Recorder:
    """An engine that records the model's arguments and skips the update."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        with torch.no_grad():
            return self.model(**kwargs)

    def backward(self, loss):
        pass

    def step(self):
        pass


class OneRank:
    world_size = 1

    def reduce_int(self, value, op):
        return value


def train_step(model, mixing, tasks=None):
    run = config_from_dict(TINY_MGMOE)
    stage = create_stage(StageConfig("warmup", epochs=1), run, 1e-3)
    return TrainStep(stage, stage.routing(None), OneRank(), torch.device("cpu"), torch.float32, run.moe,
                     tasks=tasks, mixing=mixing)


def test_the_step_passes_the_batch_unchanged_when_mixing_is_off(model):
    images, labels = batch()
    engine = Recorder(model)
    train_step(model, mixing_for_epoch(config(), 0, 0, C))(engine, {"images": images, "labels": labels}, None)
    assert torch.equal(engine.calls[0]["images"], images) and torch.equal(engine.calls[0]["targets"], labels)


def test_the_step_trains_on_mixed_images_with_soft_targets_and_no_boxes(model):
    images, labels = batch()
    boxes = {"boxes": torch.rand(6, 4), "has_box": torch.ones(6, dtype=torch.bool)}
    engine = Recorder(model)
    tasks = SimpleNamespace(bbox=SimpleNamespace(loss_weight=1.0))
    step = train_step(model, Mixing(1.0, 0.0, C), tasks=tasks)
    np.random.seed(0)
    step(engine, {"images": images, "labels": labels, **boxes}, None)
    np.random.seed(0)
    expected = mix_batch(images, labels, C, mixup_alpha=1.0)
    call = engine.calls[0]
    assert torch.equal(call["images"], expected.images) and torch.equal(call["targets"], expected.targets)
    assert not call["has_box"].any()
    step.mixing = None  # the clean epochs: the boxes are targets again
    step(engine, {"images": images, "labels": labels, **boxes}, None)
    assert engine.calls[1]["has_box"].all() and torch.equal(engine.calls[1]["targets"], labels)
