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
