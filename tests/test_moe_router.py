import pytest
import torch

from mgmoe_ds.moe.losses import load_balancing_loss, router_z_loss
from mgmoe_ds.moe.router import TopKRouter


def test_logits_are_fp32_even_for_bf16_input():
    router = TopKRouter(6, 4)
    logits = router(torch.randn(3, 6, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and logits.shape == (3, 4)


@pytest.mark.parametrize("top_k", [2, 3, 4])
def test_top_k_weights_renormalise_over_chosen(top_k):
    router = TopKRouter(6, 4)
    logits = router(torch.randn(5, 6))
    sel = router.select(logits, top_k)
    assert sel.expert_indices.shape == (5, top_k)
    torch.testing.assert_close(sel.weights.sum(-1), torch.ones(5))
    expected = sel.probs.gather(1, sel.expert_indices)
    torch.testing.assert_close(sel.weights, expected / expected.sum(-1, keepdim=True))
    # best first
    assert bool((sel.weights[:, :-1] >= sel.weights[:, 1:]).all())


def test_top_1_keeps_the_gate_probability_of_the_best_expert():
    router = TopKRouter(6, 4)
    logits = router(torch.randn(5, 6))
    sel = router.select(logits, 1)
    torch.testing.assert_close(sel.weights[:, 0], torch.softmax(logits, -1).max(-1).values)  # < 1: it has a gradient
    assert bool((sel.weights < 1).all())


def test_allowed_experts_mask_is_never_chosen_and_renormalised():
    router = TopKRouter(6, 4)
    logits = router(torch.randn(20, 6))
    allowed = torch.tensor([True, False, True, False])
    sel = router.select(logits, 2, allowed)
    assert set(sel.expert_indices.unique().tolist()) <= {0, 2}
    torch.testing.assert_close(sel.probs[:, [1, 3]], torch.zeros(20, 2))
    with pytest.raises(ValueError, match="top_k = 3"):
        router.select(logits, 3, allowed)


def test_noise_only_in_training():
    torch.manual_seed(0)
    for policy in ("jitter", "rsample"):
        router = TopKRouter(6, 8, noisy_gate_policy=policy, jitter_eps=0.5)
        x = torch.randn(64, 6)
        router.eval()
        a = router.select(router(x), 2).expert_indices
        b = router.select(router(x), 2).expert_indices
        assert torch.equal(a, b)
        router.train()
        changed = any(not torch.equal(router.select(router(x), 2).expert_indices, a) for _ in range(5))
        assert changed, f"{policy} noise never changed a choice in training"


def test_rsample_keeps_clean_weights():
    router = TopKRouter(6, 4, noisy_gate_policy="rsample").train()
    logits = router(torch.randn(10, 6))
    sel = router.select(logits, 2)
    chosen = torch.softmax(logits, -1).gather(1, sel.expert_indices)
    torch.testing.assert_close(sel.weights, chosen / chosen.sum(-1, keepdim=True))


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_skewed():
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, torch.arange(8) % 4).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    assert load_balancing_loss(skewed, torch.zeros(8, dtype=torch.long)).item() == pytest.approx(4 * 0.97)


def test_z_loss_matches_definition_and_ignores_masked_experts():
    logits = torch.tensor([[1.0, 2.0, float("-inf")], [0.0, 0.0, float("-inf")]])
    expected = torch.logsumexp(logits[:, :2], -1).square().mean()
    torch.testing.assert_close(router_z_loss(logits), expected)
    assert router_z_loss(torch.zeros(0, 3)).item() == 0.0
