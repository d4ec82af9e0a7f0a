import torch

from mgmoe_ds.moe.dispatch import (
    assign_slots,
    combine,
    expert_capacity,
    pack_rows,
    payload_spec,
    per_choice_outputs,
    plan_dispatch,
    unpack_rows,
)


def test_capacity_formula_and_minimum():
    assert expert_capacity(100, 4, 2, 1.25, 4) == 63  # ceil(1.25 * 100 * 2 / 4)
    assert expert_capacity(2, 4, 2, 1.0, 4) == 4


def test_first_choices_fill_before_second_choices_and_drops_are_counted():
    # Four tokens all want expert 0 first, expert 1 second; capacity 2.
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    w = torch.tensor([[0.6, 0.4]] * 4)
    slots = assign_slots(idx, w, num_experts=3, capacity=2)
    assert slots.kept.tolist() == [[True, True], [True, True], [False, False], [False, False]]
    assert slots.load_per_expert.tolist() == [4, 4, 0]
    assert slots.dropped_per_expert.tolist() == [2, 2, 0]
    assert slots.fully_dropped.tolist() == [False, False, True, True]


def test_losing_one_choice_renormalises_the_rest():
    idx = torch.tensor([[0, 1], [0, 2]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    slots = assign_slots(idx, w, num_experts=3, capacity=1)
    # token 0 keeps expert 0 and 1; token 1 loses expert 0 (full) and keeps expert 2 with weight 1
    assert slots.kept.tolist() == [[True, True], [False, True]]
    torch.testing.assert_close(slots.weights, torch.tensor([[0.7, 0.3], [0.0, 1.0]]))


def test_batch_prioritized_routing_drops_least_confident_first():
    idx = torch.tensor([[0], [0], [0]])
    w = torch.ones(3, 1)
    confidence = torch.tensor([0.2, 0.9, 0.5])
    slots = assign_slots(idx, w, num_experts=1, capacity=2, priority=confidence)
    assert slots.kept[:, 0].tolist() == [False, True, True]
    plain = assign_slots(idx, w, num_experts=1, capacity=2)
    assert plain.kept[:, 0].tolist() == [True, True, False]


def test_dropless_keeps_everything():
    idx = torch.randint(0, 4, (50, 2))
    slots = assign_slots(idx, torch.full((50, 2), 0.5), 4, capacity=None)
    assert bool(slots.kept.all()) and int(slots.dropped_per_expert.sum()) == 0


def test_plan_is_sorted_by_expert_and_combine_is_weighted_sum():
    idx = torch.tensor([[2, 0], [1, 2], [0, 1]])
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    kept = torch.ones(3, 2, dtype=torch.bool)
    plan = plan_dispatch(idx, kept, 3)
    assert plan.expert_index.tolist() == sorted(plan.expert_index.tolist())
    assert plan.tokens_per_expert.tolist() == [2, 2, 2]
    # expert e outputs (e+1) * token id on a 2-wide output: output width differs from payload width
    rows = torch.stack([(plan.expert_index + 1) * plan.token_index] * 2, 1).float()  # (A, 2)
    out = combine(rows, plan, w, 3)
    expected = torch.tensor([0.5 * 3 * 0 + 0.5 * 1 * 0, 0.25 * 2 * 1 + 0.75 * 3 * 1, 1.0 * 1 * 2 + 0.0])
    torch.testing.assert_close(out[:, 0], expected)
    per_choice = per_choice_outputs(rows, plan, 3, 2)
    assert per_choice[1, 1, 0].item() == 3.0  # token 1's second choice is expert 2


def test_payload_pack_round_trip_keeps_shapes_and_integer_dtypes():
    payload = {
        "level0": torch.randn(5, 3, 2, 2),
        "tokens": torch.randn(5, 4, 6),
        "labels": torch.arange(5) * 1000 + 7,
    }
    spec = payload_spec(payload)
    rows = torch.tensor([4, 0, 2])
    buffers = pack_rows(payload, spec, rows)
    assert len(buffers) == 2  # one float buffer, one int64 buffer
    back = unpack_rows(buffers, spec)
    for name, tensor in payload.items():
        assert back[name].dtype == tensor.dtype
        torch.testing.assert_close(back[name], tensor[rows])


def test_combine_matches_autograd_indexing_in_values_and_gradients():
    torch.manual_seed(0)
    num_tokens, num_experts = 9, 3
    idx = torch.randint(0, num_experts, (num_tokens, 2))
    kept = torch.rand(num_tokens, 2) > 0.2  # some dropped choices, possibly a fully dropped token
    plan = plan_dispatch(idx, kept, num_experts)
    rows = torch.randn(plan.token_index.numel(), 2, 3, requires_grad=True)  # (A, 2, 3): a non-flat output
    w = torch.rand(num_tokens, 2, requires_grad=True)
    loss_weights = torch.randn(num_tokens, 2, 3)

    out = combine(rows, plan, w, num_tokens)
    grad_rows, grad_w = torch.autograd.grad((out * loss_weights).sum(), (rows, w))

    row_weights = w[plan.token_index, plan.choice_index]  # (A,)
    reference = torch.zeros(num_tokens, 2, 3).index_add(0, plan.token_index, rows * row_weights[:, None, None])
    ref_grad_rows, ref_grad_w = torch.autograd.grad((reference * loss_weights).sum(), (rows, w))
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grad_rows, ref_grad_rows)
    torch.testing.assert_close(grad_w, ref_grad_w)
