"""The box task: the tower, its complete-IoU loss, its data-parallel normalisation, and its place in
the model, the parameter groups, the stages and the training step."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_MGMOE
from mgmoe_ds.box_tower import BoxTower, box_loss, box_loss_sum, box_statistics, centre_size_to_corners
from mgmoe_ds.config import ConfigError, StageConfig, config_from_dict
from mgmoe_ds.curriculum import create_stage
from mgmoe_ds.model import MGMoE, loss_weights
from mgmoe_ds.train.step import TrainStep

NUM_CLASSES = 4


def with_boxes(**bbox):
    block = copy.deepcopy(TINY_MGMOE)
    block["model"]["tasks"] = {"bbox": bbox or True}
    return block


# -- the loss -----------------------------------------------------------------------------------


def test_complete_iou_loss_matches_a_hand_computed_case_and_ignores_boxless_rows():
    # predicted (0, 0, .5, .5), true (0, 0, 1, 1): IoU .25; centres (.25, .25) and (.5, .5), squared
    # distance .125 over the enclosing box's squared diagonal 2 = .0625; same aspect: no v term.
    # 1 - .25 + .0625 = .8125
    predicted = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.9]])
    true = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    has_box = torch.tensor([True, False])
    assert box_loss_sum(predicted, true, has_box).item() == pytest.approx(0.8125, abs=1e-6)
    assert box_loss(predicted, true, has_box).item() == pytest.approx(0.8125, abs=1e-6)  # mean over one box
    assert box_loss(predicted, true, has_box, normaliser=2.5).item() == pytest.approx(0.8125 / 2.5, abs=1e-6)
    assert box_loss(predicted, true, torch.tensor([False, False])).item() == 0.0  # no box: no loss, no NaN


def test_box_statistics_count_iou_and_hits_at_one_half():
    predicted = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.6], [0.1, 0.1, 0.2, 0.2]])
    true = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.6, 0.6]])
    stats = box_statistics(predicted, true, torch.tensor([True, True, True, False]))
    # IoUs .25, 1, .6 over three boxed images; two of them >= .5
    torch.testing.assert_close(stats, torch.tensor([3.0, 1.85, 2.0], dtype=torch.float64))


def test_centre_size_to_corners_clips_to_the_image():
    corners = centre_size_to_corners(torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.9, 0.1, 0.4, 0.4]]))
    torch.testing.assert_close(corners, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.7, 0.0, 1.0, 0.3]]))


def test_per_rank_normaliser_gives_the_gradient_of_the_global_mean_over_boxes():
    """Two ranks with 3 and 1 boxes: with the trainer's normaliser (4 boxes / 2 ranks) the mean of
    the ranks' gradients (what data parallelism applies) is the gradient of the mean over all 4
    boxes in one process; each rank's own mean would weight rank 1's single box three times over."""
    torch.manual_seed(0)
    tower = BoxTower(8, (4, 4), channels=4, grid=2, hidden=8)
    tokens = torch.randn(6, 16, 8)
    true = torch.tensor([[0.1, 0.1, 0.5, 0.6]] * 6) + torch.linspace(0, 0.3, 6)[:, None]
    has_box = torch.tensor([True, True, True, False, False, True])
    ranks = [slice(0, 3), slice(3, 6)]

    def gradient(loss_of):
        tower.zero_grad()
        loss_of().backward()
        return torch.cat([p.grad.flatten() for p in tower.parameters()])

    one_process = gradient(lambda: box_loss(tower(tokens), true, has_box))
    normaliser = 4 / 2
    data_parallel = sum(gradient(lambda r=r: box_loss(tower(tokens[r]), true[r], has_box[r], normaliser))
                        for r in ranks) / 2
    torch.testing.assert_close(data_parallel, one_process, atol=1e-7, rtol=1e-5)
    per_rank_means = sum(gradient(lambda r=r: box_loss(tower(tokens[r]), true[r], has_box[r])) for r in ranks) / 2
    assert not torch.allclose(per_rank_means, one_process, atol=1e-6)


# -- the tower ----------------------------------------------------------------------------------


def test_the_tower_learns_where_a_marked_token_is():
    """Tokens carry a marker at the object's grid cells: the tower must read token positions (a
    tower that pooled positions away could not get past the mean box's IoU)."""
    torch.manual_seed(0)
    grid = 6
    tower = BoxTower(8, (grid, grid), channels=8, grid=grid, hidden=64)
    optimizer = torch.optim.Adam(tower.parameters(), lr=3e-3)

    def sample(n, generator):
        x1, y1 = torch.randint(0, grid - 2, (2, n), generator=generator)
        w, h = torch.randint(1, 3, (2, n), generator=generator)
        tokens = torch.randn(n, grid, grid, 8, generator=generator) * 0.1  # (n, H, W, C)
        for i in range(n):
            tokens[i, y1[i]:y1[i] + h[i], x1[i]:x1[i] + w[i], 0] += 1.0
        boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1).float() / grid  # (n, 4)
        return tokens.reshape(n, grid * grid, 8), boxes  # (n, N, C)

    generator = torch.Generator().manual_seed(1)
    for _ in range(400):
        tokens, boxes = sample(32, generator)
        loss = box_loss(tower(tokens), boxes, torch.ones(32, dtype=torch.bool))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens, boxes = sample(256, torch.Generator().manual_seed(2))
    with torch.no_grad():
        count, iou_sum, _ = box_statistics(tower(tokens), boxes, torch.ones(256, dtype=torch.bool)).tolist()
        mean_box = boxes.mean(0, keepdim=True).expand_as(boxes)
        _, baseline_sum, _ = box_statistics(mean_box, boxes, torch.ones(256, dtype=torch.bool)).tolist()
    assert iou_sum / count > 0.6 and iou_sum / count > baseline_sum / count + 0.3


def test_tower_rejects_tokens_that_do_not_fill_its_grid():
    with pytest.raises(ValueError, match="15 tokens, but the grid is 4 x 4"):
        BoxTower(8, (4, 4))(torch.zeros(1, 15, 8))


# -- the model, the config, the stages, the step ------------------------------------------------


def test_model_with_the_box_task_predicts_boxes_and_adds_the_loss_only_with_targets():
    config = config_from_dict(with_boxes())
    torch.manual_seed(0)
    model = MGMoE(config.model, config.moe, NUM_CLASSES).eval()
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    out = model(images, labels)
    assert out.boxes.shape == (3, 4) and "bbox" not in out.losses
    assert bool((out.boxes[:, 2:] >= out.boxes[:, :2]).all()) and bool(((0 <= out.boxes) & (out.boxes <= 1)).all())
    true = torch.tensor([[0.1, 0.2, 0.5, 0.9]] * 3)
    out = model(images, labels, boxes=true, has_box=torch.tensor([True, False, True]))
    expected = box_loss(out.boxes, true, torch.tensor([True, False, True]))
    assert out.losses["bbox"].item() == pytest.approx(expected.item())
    assert config.model.tasks.bbox.loss_weight == 1.0 and loss_weights(config.moe, tasks=config.model.tasks)["bbox"] == 1.0


def test_the_box_task_leaves_every_other_initial_weight_unchanged_and_has_its_own_group():
    plain = config_from_dict(copy.deepcopy(TINY_MGMOE))
    boxed = config_from_dict(with_boxes())
    torch.manual_seed(3)
    without = MGMoE(plain.model, plain.moe, NUM_CLASSES).state_dict()
    torch.manual_seed(3)
    model = MGMoE(boxed.model, boxed.moe, NUM_CLASSES)
    state = model.state_dict()
    assert set(state) - set(without) == {k for k in state if k.startswith("box_tower.")} != set()
    for key, value in without.items():
        assert torch.equal(state[key], value), key
    groups = model.parameter_groups()
    assert {id(p) for p in groups["box_tower"]} == {id(p) for p in model.box_tower.parameters()}
    assert not any(id(p) in {id(q) for q in model.box_tower.parameters()} for p in groups["backbone"])


def test_the_tower_trains_with_the_backbone_unless_a_stage_says_otherwise():
    config = config_from_dict(with_boxes())
    warmup = create_stage(StageConfig("warmup", steps=1), config, base_lr=0.1)
    residual = create_stage(StageConfig("residual", steps=1), config, base_lr=0.1)
    assert warmup.group_lr["box_tower"] == warmup.group_lr["backbone"]
    assert "backbone" not in residual.group_lr and "box_tower" not in residual.group_lr
    custom = create_stage(StageConfig("residual", steps=1, lr={"expert_heads": 0.1, "box_tower": 0.05}), config, 0.1)
    assert custom.group_lr == {"expert_heads": 0.1, "box_tower": 0.05}
    frozen_backbone = config_from_dict({**with_boxes(), "train": {"freeze": ["backbone"]}})
    warmup = create_stage(StageConfig("warmup", steps=1), frozen_backbone, base_lr=0.1)
    assert "backbone" not in warmup.group_lr and "box_tower" not in warmup.group_lr  # it follows its features


def test_box_task_config_short_form_ranges_and_lr_without_the_task():
    assert config_from_dict(with_boxes()).model.tasks.bbox.grid == 7
    assert config_from_dict(with_boxes(grid=3, loss_weight=0.5)).model.tasks.bbox.loss_weight == 0.5
    with pytest.raises(ConfigError, match=r"mgmoe\.model\.tasks\.bbox\.grid"):
        config_from_dict(with_boxes(grid=0))
    with pytest.raises(ConfigError, match=r"unknown key model\.tasks\.bbox\.size"):
        config_from_dict(with_boxes(size=3))
    block = copy.deepcopy(TINY_MGMOE)
    block["curriculum"]["stages"][0]["lr"] = {"backbone": 0.1, "box_tower": 0.1}
    with pytest.raises(ConfigError, match=r"lr\.box_tower"):
        config_from_dict(block)
    assert config_from_dict(copy.deepcopy(TINY_MGMOE)).model.tasks.bbox is None


def test_step_hands_boxes_and_the_world_normaliser_to_the_model(world_of_one):
    from mgmoe_ds.train.distributed import Collectives

    config = config_from_dict(with_boxes())
    stage = create_stage(StageConfig("warmup", steps=1), config, base_lr=0.1)
    step = TrainStep(stage, stage.routing(None), Collectives(torch.device("cpu")), torch.device("cpu"), torch.float32,
                     config.moe, tasks=config.model.tasks)
    batch = {"images": torch.zeros(3, 3, 32, 32), "labels": torch.zeros(3, dtype=torch.long),
             "boxes": torch.rand(3, 4), "has_box": torch.tensor([True, False, True])}
    targets = step.box_targets(batch)
    assert targets["box_normaliser"] == 2.0 and torch.equal(targets["has_box"], batch["has_box"])
    assert step.box_targets({k: v for k, v in batch.items() if k not in ("boxes", "has_box")}) == {}
    plain = TrainStep(stage, stage.routing(None), step.comm, torch.device("cpu"), torch.float32, config.moe)
    assert plain.box_targets(batch) == {}


def _data_parallel_box_worker(rank: int, world_size: int, out: str) -> None:
    import torch.distributed as dist

    from mgmoe_ds.train.distributed import Collectives

    tower, tokens, true, has_box = _two_rank_case()
    rows = slice(3 * rank, 3 * rank + 3)
    config = config_from_dict(with_boxes())
    stage = create_stage(StageConfig("warmup", steps=1), config, base_lr=0.1)
    step = TrainStep(stage, stage.routing(None), Collectives(torch.device("cpu")), torch.device("cpu"), torch.float32,
                     config.moe, tasks=config.model.tasks)
    targets = step.box_targets({"boxes": true[rows], "has_box": has_box[rows]})
    box_loss(tower(tokens[rows]), targets["boxes"], targets["has_box"], targets["box_normaliser"]).backward()
    grads = torch.cat([p.grad.flatten() for p in tower.parameters()])
    dist.all_reduce(grads)  # what DeepSpeed does with a data-parallel gradient: the mean over ranks
    if rank == 0:
        torch.save(grads / world_size, out)


def _two_rank_case():
    torch.manual_seed(0)
    tower = BoxTower(8, (4, 4), channels=4, grid=2, hidden=8)
    tokens = torch.randn(6, 16, 8)
    true = torch.tensor([[0.1, 0.1, 0.5, 0.6]] * 6) + torch.linspace(0, 0.3, 6)[:, None]
    has_box = torch.tensor([True, True, True, False, False, True])  # 3 boxes on rank 0, 1 on rank 1
    return tower, tokens, true, has_box


@pytest.mark.slow
def test_two_ranks_with_uneven_boxes_get_the_one_process_gradient(tmp_path):
    from dist_utils import run_ranks

    run_ranks(_data_parallel_box_worker, 2, str(tmp_path / "grads.pt"), timeout=180)
    tower, tokens, true, has_box = _two_rank_case()
    box_loss(tower(tokens), true, has_box).backward()  # the mean over all 4 boxes in one process
    expected = torch.cat([p.grad.flatten() for p in tower.parameters()])
    torch.testing.assert_close(torch.load(tmp_path / "grads.pt"), expected, atol=1e-7, rtol=1e-5)
