"""FLOPs and parameter counting helpers."""

from __future__ import annotations

import torch
from torch import nn

from mgmoe_ds.flops import count_flops, count_parameters, flops_per_image


def test_linear_flops_are_two_per_multiply_add():
    layer = nn.Linear(10, 20)
    x = torch.randn(4, 10)
    assert count_flops(layer, x) == 2 * 4 * 10 * 20
    assert flops_per_image(layer, x, batch_size=4) == 2 * 10 * 20
    assert count_flops(lambda t: layer(t) @ torch.ones(20, 3), x) == 2 * 4 * 10 * 20 + 2 * 4 * 20 * 3


def test_conv_flops_and_keyword_arguments():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, input=torch.randn(1, 3, 5, 5)) == 2 * 8 * 3 * 9 * 25


def test_parameters_counted_once_and_trainable_only():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    assert count_parameters(model) == 20 + 10
    model[3].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 20
    assert count_parameters(list(model[3].parameters())) == 10


def test_inputs_that_require_grad_are_counted():
    layer = nn.Linear(6, 3)
    features = {"pooled": torch.randn(2, 6, requires_grad=True) * 2}  # a non-leaf, as backbone outputs are
    assert count_flops(lambda payload: layer(payload["pooled"]), features) == 2 * 2 * 6 * 3
