"""One training step and the stages, in one process without DeepSpeed: a plain torch.optim engine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MGMOE
from mgmoe_ds.config import StageConfig, config_from_dict
from mgmoe_ds.curriculum import STAGES, Stage, create_stage, register_stage
from mgmoe_ds.model import MGMoE
from mgmoe_ds.moe.routing import RoutingRequest
from mgmoe_ds.train.step import TrainStep, trained_groups

NUM_CLASSES = 4


class PlainEngine:
    """What the step needs of DeepSpeed's engine (forward, backward, step), with plain SGD."""

    def __init__(self, model, groups):
        self.module = model
        self.optimizer = torch.optim.SGD([{"params": g["params"], "lr": g["lr"]} for g in groups])

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def tiny(**changes):
    block = dict(TINY_MGMOE, **changes)
    config = config_from_dict(block)
    torch.manual_seed(0)
    return config, MGMoE(config.model, config.moe, NUM_CLASSES).eval()  # eval: no random draws in the experts


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g)}


def make_step(config, stage, comm):
    return TrainStep(stage, stage.routing(None), comm, torch.device("cpu"), torch.float32, config.moe)


def test_a_warmup_step_descends_the_hand_weighted_objective(world_of_one):
    from mgmoe_ds.train.distributed import Collectives

    config, model = tiny(moe={"top_k": 2, "load_balance_weight": 0.2, "z_loss_weight": 0.05})
    stage = create_stage(StageConfig("warmup", steps=1), config, base_lr=0.1)
    reference = copy.deepcopy(model)
    engine = PlainEngine(model, trained_groups(model, stage))
    data = batch()
    result = make_step(config, stage, Collectives(torch.device("cpu")))(engine, data, None)
    assert result.finite and result.images == 6

    # the same objective written out by hand: task + 0.5 fallback + every expert loss at 1, the
    # router's losses off in warm-up (its weights stay frozen anyway)
    out = reference(data["images"], data["labels"], routing=RoutingRequest.dense(uniform_weights=True))
    expert_losses = [v for k, v in out.losses.items() if k.startswith("moe.") and k.split(".")[1] in
                     ("mpsa", "pmg", "transfg", "pim")]
    assert expert_losses  # the real experts' own losses take part
    objective = (F.cross_entropy(out.logits, data["labels"]) + 0.5 * out.losses["fallback"] + sum(expert_losses))
    objective.backward()
    for (name, after), (_, before) in zip(model.named_parameters(), reference.named_parameters()):
        if name.startswith("moe.router."):
            assert torch.equal(after, before), "warm-up froze the router"
            continue
        expected = before.detach() - 0.1 * (before.grad if before.grad is not None else 0.0)
        torch.testing.assert_close(after.detach(), expected, atol=1e-6, rtol=1e-5, msg=name)


def test_a_non_finite_loss_skips_the_update(world_of_one):
    from mgmoe_ds.train.distributed import Collectives

    config, model = tiny()
    stage = create_stage(StageConfig("warmup", steps=1), config, base_lr=0.1)
    before = copy.deepcopy(model.state_dict())
    engine = PlainEngine(model, trained_groups(model, stage))
    data = batch()
    data["images"][0, 0, 0, 0] = float("nan")
    result = make_step(config, stage, Collectives(torch.device("cpu")))(engine, data, None)
    assert not result.finite
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class ConfidentRouterStage(Stage):
    """A toy stage, as a user would add one: trains only the router, Top-1, and adds a loss of its
    own (the router's entropy) with its own weight."""

    default_lr = {"router": 1.0}

    def routing(self, clusters):
        return RoutingRequest(top_k=1)

    def extra_losses(self, out, clusters):
        probs = out.route.probs
        return {"router_entropy": -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()}

    def own_loss_weights(self):
        return {"router_entropy": 2.0, "moe.*": 0.0}


@pytest.fixture
def toy_stage():
    register_stage("confident_router")(ConfidentRouterStage)
    yield "confident_router"
    STAGES.unregister("confident_router")


def test_a_registered_stage_is_validated_created_and_trained_like_the_built_in_ones(toy_stage, world_of_one):
    from mgmoe_ds.train.distributed import Collectives

    stages = [{"name": "warmup", "steps": 1}, {"name": toy_stage, "steps": 2}]
    config, model = tiny(curriculum={"stages": stages, "num_clusters": 2})  # the config accepts the new name
    stage = create_stage(config.curriculum.stages[1], config, base_lr=0.5)
    assert isinstance(stage, ConfidentRouterStage) and stage.group_lr == {"router": 0.5}
    before = copy.deepcopy(model.state_dict())
    engine = PlainEngine(model, trained_groups(model, stage))
    step = make_step(config, stage, Collectives(torch.device("cpu")))
    entropies = [float(step(engine, batch(seed=s), None).losses["router_entropy"]) for s in range(3)]
    moved = {k for k, v in before.items() if not torch.equal(model.state_dict()[k], v)}
    assert moved == {"moe.router.gate.weight"}  # only what the stage trains
    assert entropies[-1] < entropies[0]  # and it trains what its own loss asks


def test_a_stage_name_that_is_not_registered_fails_at_load():
    from mgmoe_ds.config import ConfigError

    with pytest.raises(ConfigError, match=r"curriculum.stages\[0\].name = 'confident_router': expected a registered "
                                          r"stage: \"fusion\", \"residual\", \"routing\", \"warmup\""):
        config_from_dict({"curriculum": {"stages": [{"name": "confident_router", "steps": 1}]}})
    with pytest.raises(ConfigError, match=r"stages\[0\].lr: unknown parameter group 'head'; accepted: backbone"):
        config_from_dict({"curriculum": {"stages": [{"name": "residual", "steps": 1, "lr": {"head": 0.1}}]}})
    with pytest.raises(ConfigError, match=r"stages\[0\].lr = .*: expected at least one parameter group with lr > 0"):
        config_from_dict({"curriculum": {"stages": [{"name": "residual", "steps": 1, "lr": {"router": 0.0}}]}})


def test_a_dataset_without_the_validation_split_is_refused_in_one_line(tmp_path):
    from conftest import write_small_set
    from mgmoe_ds.data import DataError
    from mgmoe_ds.train.data import RunData

    config, _ = tiny()
    dataset = write_small_set(tmp_path, "no_val", {"train": 16, "test": 8}, shard_size=16)
    with pytest.raises(DataError) as error:
        RunData(config, str(dataset), rank=0, world_size=1, micro_batch=8, pin_memory=False, transform_options={})
    assert str(error.value) == (f"{dataset}: no 'val' split: the routing teacher and the cluster-level routing are "
                                f"fitted on it; rebuild the dataset with `mgmoe shards build` (it carves a validation "
                                f"split from train, --val-fraction 0.1) or set mgmoe.data.val_split")


# ---------------------------------------------------------------------------------------------
# data.pseudo_weight: a pseudo-labelled image's weight in the losses on its label


class OneRank:
    world_size = 1

    def reduce_int(self, value, op):
        return value


def pseudo_step(config, stage, pseudo_weight):
    return TrainStep(stage, stage.routing(None), OneRank(), torch.device("cpu"), torch.float32, config.moe,
                     pseudo_weight=pseudo_weight)


def per_image_ce(logits, targets):
    """(B,) each image's cross-entropy, one F.cross_entropy call per image."""
    return torch.stack([F.cross_entropy(logits[i:i + 1].float(), targets[i:i + 1]) for i in range(len(logits))])


def test_a_pseudo_labelled_image_counts_pseudo_weight_times_in_the_losses_on_its_label():
    config, model = tiny()
    stage = create_stage(StageConfig("warmup", steps=1), config, base_lr=0.1)
    reference = copy.deepcopy(model)
    data = dict(batch(n=3, seed=1), pseudo=torch.tensor([False, False, True]))
    result = pseudo_step(config, stage, 0.5)(PlainEngine(model, trained_groups(model, stage)), data, None)
    assert result.finite
    with torch.no_grad():  # the model before the update, routed as the stage routes (dense: every expert)
        out = reference(data["images"], data["labels"], routing=stage.routing(None))
        task = per_image_ce(out.logits, data["labels"])  # (3,)
        fallback = per_image_ce(reference.moe.fallback_head(out.pooled), data["labels"])  # (3,)
    expected = (task[0] + task[1] + 0.5 * task[2]) / 3  # divided by the images, not by the weights' sum
    torch.testing.assert_close(result.losses["task"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.losses["fallback"], (fallback[0] + fallback[1] + 0.5 * fallback[2]) / 3,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(result.losses["task"], task.mean())  # the weight did something
    # each expert's standalone CE: the same weights over the images it ran (all three, dense)
    for e, label in enumerate(reference.expert_labels):
        column = (out.route.expert_indices == e).float().argmax(dim=1)  # (3,) where expert e sits per image
        own = per_image_ce(out.expert_logits[torch.arange(3), column], data["labels"])  # (3,)
        torch.testing.assert_close(result.losses[f"moe.{label}.standalone"], (own[0] + own[1] + 0.5 * own[2]) / 3,
                                   rtol=1e-5, atol=1e-6, msg=label)


def test_a_batch_without_pseudo_labels_keeps_exactly_its_unweighted_loss():
    config, model = tiny()
    stage = create_stage(StageConfig("warmup", steps=1), config, base_lr=0.1)
    data = batch(n=4, seed=2)
    plain_model = copy.deepcopy(model)
    plain = pseudo_step(config, stage, 1.0)(PlainEngine(plain_model, trained_groups(plain_model, stage)), data, None)
    marked = dict(data, pseudo=torch.zeros(4, dtype=torch.bool))
    weighted = pseudo_step(config, stage, 0.3)(PlainEngine(model, trained_groups(model, stage)), marked, None)
    assert plain.losses.keys() == weighted.losses.keys()
    assert all(torch.equal(plain.losses[k], weighted.losses[k]) for k in plain.losses)
    assert all(torch.equal(a, b) for a, b in zip(plain_model.state_dict().values(), model.state_dict().values()))


def test_pseudo_weight_0_leaves_a_pseudo_image_no_gradient_from_the_losses_on_its_label():
    config, model = tiny()
    data = batch(n=3, seed=3)
    label_losses = ("task", "fallback", *(f"moe.{label}.standalone" for label in model.expert_labels))

    def image_gradient(weights):
        images = data["images"].clone().requires_grad_(True)
        out = model(images, data["labels"], routing=RoutingRequest.dense(), sample_weights=weights)
        sum(out.losses[name] for name in label_losses).backward()
        model.zero_grad(set_to_none=True)
        return images.grad  # (3, 3, H, W)

    full, half, none = (image_gradient(torch.tensor([1.0, 1.0, w])) for w in (1.0, 0.5, 0.0))
    assert torch.count_nonzero(none[2]) == 0 and torch.count_nonzero(none[:2]) > 0  # the pseudo image's is 0
    torch.testing.assert_close(none[:2], full[:2])  # the others' unchanged
    torch.testing.assert_close(half[2], 0.5 * full[2], rtol=1e-4, atol=1e-8)  # and in between, linear
    assert torch.count_nonzero(full[2]) > 0


def test_sample_weights_follow_the_pseudo_flags_and_a_mix_of_images():
    from mgmoe_ds.train.mixing import Mixed

    step = TrainStep(None, RoutingRequest(), OneRank(), torch.device("cpu"), torch.float32, None, pseudo_weight=0.25)
    flags = {"pseudo": torch.tensor([True, False, False, False])}
    assert torch.equal(step.sample_weights(flags)["sample_weights"], torch.tensor([0.25, 1.0, 1.0, 1.0]))
    assert step.sample_weights({"pseudo": torch.zeros(4, dtype=torch.bool)}) == {}  # no pseudo-label: none
    assert step.sample_weights({}) == {}  # cached features and other batches without the flag
    # Mixup/CutMix with the flipped batch: image 0 is 0.7 of itself and 0.3 of image 3, image 3 the reverse
    mixed = Mixed(torch.zeros(4, 3, 2, 2), torch.zeros(4, 2), 0.7, None)
    torch.testing.assert_close(step.sample_weights(flags, mixed)["sample_weights"],
                               torch.tensor([0.7 * 0.25 + 0.3, 1.0, 1.0, 0.7 + 0.3 * 0.25]))
    unit = TrainStep(None, RoutingRequest(), OneRank(), torch.device("cpu"), torch.float32, None)
    assert unit.sample_weights(flags) == {}  # pseudo_weight 1: the plain mean


def test_soft_targets_take_the_same_per_image_weights():
    from mgmoe_ds.moe.losses import weighted_cross_entropy

    g = torch.Generator().manual_seed(4)
    logits, targets = torch.randn(3, 5, generator=g), torch.softmax(torch.randn(3, 5, generator=g), dim=1)
    soft = torch.stack([F.cross_entropy(logits[i:i + 1], targets[i:i + 1]) for i in range(3)])  # (3,)
    weights = torch.tensor([1.0, 1.0, 0.5])
    torch.testing.assert_close(weighted_cross_entropy(logits, targets, weights),
                               (soft[0] + soft[1] + 0.5 * soft[2]) / 3)
    assert torch.equal(weighted_cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    # a teacher's distill.cosine weighs images the same way
    from mgmoe_ds.distillation import cosine_loss

    cosines = torch.stack([cosine_loss(logits[i:i + 1], targets[i:i + 1]) for i in range(3)])  # (3,)
    torch.testing.assert_close(cosine_loss(logits, targets, weights), (cosines[0] + cosines[1] + 0.5 * cosines[2]) / 3)


def test_pseudo_weight_below_1_trains_a_frozen_backbone_from_images_not_the_feature_cache(tmp_path):
    from types import SimpleNamespace

    from mgmoe_ds.train.stage_features import StageFeatures

    for weight, cached in ((1.0, True), (0.5, False)):
        config = config_from_dict(dict(TINY_MGMOE, data={"pseudo_weight": weight}))
        features = StageFeatures(config, SimpleNamespace(token_moe_layers=dict), None, tmp_path,
                                 device=torch.device("cpu"), input_dtype=torch.float32, is_main=False)
        refusal = features.refusal(create_stage(StageConfig("residual", epochs=1), config, 1e-3))
        assert (refusal is None) == cached and (cached or "data.pseudo_weight" in refusal)
