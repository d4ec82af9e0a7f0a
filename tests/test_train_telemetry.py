"""The stage clock: the end of a stage from its own measured step and validation times (hand-computed)."""

from __future__ import annotations

import re

from mgmoe_ds.train.telemetry import StageClock


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stage_clock_estimates_from_measured_steps_then_counts_validation_in():
    clock = FakeClock()
    stage = StageClock("routing", total_steps=30, done_steps=0, steps_per_epoch=10, measure=4, clock=clock,
                       wall=lambda: 0.0)
    clock.now = 5.0  # step 1 (engine start, first batch: not timed)
    assert stage.step() is None
    lines = []
    for t in (7.0, 9.0, 11.0, 13.0):  # 2 s per step
        clock.now = t
        lines.append(stage.step())
    assert lines[:3] == [None, None, None]
    # (13 - 5) / 4 = 2.0 s/step; 25 steps left -> 50 s; no validation measured yet
    assert re.fullmatch(r"stage routing: 2\.00 s/step measured; about 50 s left \(25 steps\), ends ~\d\d:\d\d",
                        lines[3])
    for t in (15.0, 17.0, 19.0, 21.0, 23.0):  # the rest of epoch 1
        clock.now = t
        assert stage.step() is None  # said once
    stage.validation_starts()
    clock.now = 26.0  # a 3 s validation
    # 20 steps x 2 s + 2 validations still to come x 3 s = 46 s
    assert re.fullmatch(r"stage routing: epoch 1 took 26 s \(validation 3 s\); about 46 s left \(20 steps\), "
                        r"ends ~\d\d:\d\d", stage.epoch_ends(1))


def test_stage_clock_resumed_mid_stage_counts_only_the_steps_left():
    clock = FakeClock()
    stage = StageClock("warmup", total_steps=3000, done_steps=2000, steps_per_epoch=1000, measure=10, clock=clock,
                       wall=lambda: 0.0)
    line = None
    for i in range(11):
        clock.now = 60.0 * i  # a minute per step; the first is not timed
        line = stage.step() or line
    # 989 steps left x 60 s = 59,340 s = 16.5 h; one validation (not yet measured, 0 s)
    assert line.startswith("stage warmup: 60.00 s/step measured; about 16.5 h left (989 steps)")


def test_stage_clock_without_a_timed_step_takes_the_epoch_time_less_validation():
    clock = FakeClock()
    stage = StageClock("residual", total_steps=4, done_steps=0, steps_per_epoch=2, measure=10, clock=clock,
                       wall=lambda: 0.0)
    clock.now = 1.0
    stage.step()  # untimed
    clock.now = 4.0
    assert stage.step() is None  # 1 timed step of 3 s; measure is min(10, 4 - 0 - 1) = 3, not reached
    stage.validation_starts()
    clock.now = 6.0  # validation 2 s
    # step time = (6 - 2 - 1) / 1 = 3 s; 2 steps left x 3 s + 1 validation x 2 s = 8 s
    assert re.fullmatch(r"stage residual: epoch 1 took 6 s \(validation 2 s\); about 8 s left \(2 steps\), "
                        r"ends ~\d\d:\d\d", stage.epoch_ends(1))


def test_the_window_counts_the_steps_each_backbone_expert_was_masked_out_of_the_gate():
    from types import SimpleNamespace

    import torch

    from mgmoe_ds.train.telemetry import Window

    def result(masked: list[int], tokens: int = 3):
        logits = torch.zeros(tokens, 4)
        logits[:, masked] = float("-inf")  # the hard constraint's mask: out for every token
        logits[:1, 3] = float("-inf")  # out for one token only: not masked
        route = SimpleNamespace(load_per_expert=torch.ones(4), dropped_per_expert=torch.zeros(4), logits=logits)
        head = SimpleNamespace(load_per_expert=torch.ones(2), dropped_per_expert=torch.zeros(2))
        return SimpleNamespace(losses={}, images=1, seconds=0.1, out=SimpleNamespace(route=head, routes={
            "moe": head, "blocks.5.1": route}))

    window = Window(num_experts=2)
    for masked in ([0], [0, 2], []):
        window.add(result(masked))
    window.add(result([1], tokens=0))  # no tokens on this rank this step: not counted
    masked = window.block_load["blocks.5.1"][2].tolist() + [window.block_steps["blocks.5.1"]]
    assert masked == [2.0, 0.0, 1.0, 0.0, 3.0]  # per expert, then steps
