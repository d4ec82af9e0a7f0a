"""The experts' diversity loss (``moe/losses.py``) against hand-computed cases and a reference loop."""

import math

import pytest
import torch

from mgmoe_ds.moe.losses import diversity_loss


def logits_of(*distributions):
    """(1, K, C) logits whose softmax is each given distribution (their log)."""
    return torch.tensor(distributions, dtype=torch.float64).log().float()[None]


def test_two_experts_three_classes_by_hand():
    # p_1 = (1/2, 1/4, 1/4), p_2 = (1/4, 1/2, 1/4), so p = (3/8, 3/8, 1/4).
    # KL(p_1 || p) = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln(1) = 0.143841 - 0.101366 = 0.042475,
    # and KL(p_2 || p) the same by symmetry: L = -(ln(4/3) + 1/2 ln(2/3)) = -0.084950.
    logits = logits_of([0.5, 0.25, 0.25], [0.25, 0.5, 0.25])
    expected = -(math.log(4 / 3) + 0.5 * math.log(2 / 3))
    assert expected == pytest.approx(-0.084950, abs=1e-6)
    assert float(diversity_loss(logits, torch.ones(1, 2, dtype=torch.bool))) == pytest.approx(expected, abs=1e-6)


def test_the_issues_case_two_experts_each_sure_of_half():
    # p_1 = (1/2, 1/2, 0), p_2 = (1/2, 0, 1/2): p = (1/2, 1/4, 1/4), each KL = 1/2 ln(1) + 1/2 ln(2),
    # so L = -ln 2. A logit of -40 stands in for probability 0 (e^-40 ~ 4e-18).
    logits = torch.tensor([[[0.0, 0.0, -40.0], [0.0, -40.0, 0.0]]])
    assert float(diversity_loss(logits, torch.ones(1, 2, dtype=torch.bool))) == pytest.approx(-math.log(2), abs=1e-6)


def test_experts_sure_of_distinct_classes_reach_the_bound():
    # K experts each certain of a different class: p is uniform over those K, each KL = ln K.
    logits = torch.full((1, 3, 5), -60.0)
    logits[0, [0, 1, 2], [0, 2, 4]] = 0.0
    assert float(diversity_loss(logits, torch.ones(1, 3, dtype=torch.bool))) == pytest.approx(-3 * math.log(3),
                                                                                              abs=1e-5)


def test_identical_experts_give_zero():
    logits = torch.randn(4, 1, 7).expand(4, 3, 7)  # every expert predicts the same per image
    assert float(diversity_loss(logits, torch.ones(4, 3, dtype=torch.bool))) == pytest.approx(0.0, abs=1e-6)


def test_an_expert_not_kept_does_not_count():
    pair = logits_of([0.5, 0.25, 0.25], [0.25, 0.5, 0.25])[0]  # (2, 3): L = -0.084950 on its own
    third = torch.tensor([[9.0, -5.0, 3.0]])  # very different, but dropped for capacity
    logits = torch.cat([pair, third])[None]  # (1, 3, 3)
    kept = torch.tensor([[True, True, False]])
    alone = diversity_loss(pair[None], torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(diversity_loss(logits, kept), alone)
    assert float(diversity_loss(logits, torch.ones(1, 3, dtype=torch.bool))) < float(alone)  # kept, it would count


def test_images_with_fewer_than_two_kept_experts_add_zero_to_the_mean_over_all_images():
    pair = logits_of([0.5, 0.25, 0.25], [0.25, 0.5, 0.25])[0]  # (2, 3)
    logits = torch.stack([pair, pair, pair])  # (3 images, 2, 3)
    kept = torch.tensor([[True, True], [True, False], [False, False]])  # 2 kept, 1 kept, none (fallback)
    expected = -(math.log(4 / 3) + 0.5 * math.log(2 / 3)) / 3  # the mean runs over all 3 images
    loss = diversity_loss(logits.requires_grad_(), kept)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1:].abs().sum() == 0  # the two images without a pair get no gradient
    # top-1 routing: no image has two experts
    assert float(diversity_loss(torch.randn(5, 1, 4), torch.ones(5, 1, dtype=torch.bool))) == 0.0


def test_matches_a_per_image_reference_loop():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, 5) * 3
    kept = torch.rand(6, 4) < 0.6
    total = 0.0
    for b in range(6):
        chosen = logits[b, kept[b]].double().softmax(dim=-1)  # (k, C)
        if chosen.shape[0] >= 2:
            mean = chosen.mean(dim=0)
            total -= float((chosen * (chosen.log() - mean.log())).sum())
    assert float(diversity_loss(logits, kept)) == pytest.approx(total / 6, abs=1e-5)


def test_a_gradient_step_makes_the_experts_disagree_more():
    logits = torch.tensor([[[1.0, 0.5, 0.0], [0.8, 0.6, 0.1]]], requires_grad=True)
    kept = torch.ones(1, 2, dtype=torch.bool)
    before = diversity_loss(logits, kept)
    before.backward()
    after = diversity_loss(logits.detach() - 1.0 * logits.grad, kept)
    assert float(after) < float(before.detach()) < 0


def test_empty_batch_and_low_precision_inputs():
    empty = torch.zeros(0, 2, 3, requires_grad=True)
    loss = diversity_loss(empty, torch.zeros(0, 2, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and loss.requires_grad  # stays in the graph: every rank runs the same backward
    logits = logits_of([0.5, 0.25, 0.25], [0.25, 0.5, 0.25]).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diversity_loss(logits, torch.ones(1, 2, dtype=torch.bool))
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(-0.084950, abs=2e-3)  # the logits themselves were rounded to bf16
