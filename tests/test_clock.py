"""The clock gives every scheduled value of a run, step by step, and the stages.

The references are written here from the official code: DINO's ``utils.cosine_scheduler`` (the
learning rate, weight decay and EMA momentum: an ``np.linspace`` warm-up, then a cosine over the
remaining iterations), DINO's teacher-temperature schedule (``np.linspace`` over the warm-up
epochs, then constant, indexed by epoch) and DINOv2's (the same, indexed by iteration), the
DINOv2/v3 last-layer freeze (``last_layer_lr_schedule.schedule[:freeze_iters] = 0``), DINOv3's Gram
anchoring start; and the stage rules of :class:`~dinokit.settings.StageSettings`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinokit.clock import Clock, ManualTime, TermTiming, place_stages
from dinokit.settings import OptimSettings, StageSettings, TeacherSettings


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """DINO's utils.cosine_scheduler, as published."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


EPOCHS, SPE, BATCH = 6, 5, 64  # 30 steps
OPTIM = OptimSettings(lr=0.0005, min_lr=1e-6, warmup_epochs=2, weight_decay=0.04, weight_decay_end=0.4,
                      freeze_last_layer_epochs=1, lr_scaling="linear", lr_reference_batch=256)


def teacher(unit: str) -> TeacherSettings:
    return TeacherSettings(temperature=0.07, warmup_temperature=0.04, warmup_epochs=3, warmup_unit=unit,
                           momentum=0.996, final_momentum=1.0)


def test_one_stage_run_follows_the_official_schedules_at_every_step():
    clock = Clock(OPTIM, teacher("epoch"), {"dino": TermTiming(1.0)}, total_steps=EPOCHS * SPE,
                  steps_per_epoch=SPE, global_batch=BATCH, freeze_in_epochs=True)
    peak = 0.0005 * BATCH / 256
    lr = cosine_scheduler(peak, 1e-6, EPOCHS, SPE, warmup_epochs=2)
    wd = cosine_scheduler(0.04, 0.4, EPOCHS, SPE)
    momentum = cosine_scheduler(0.996, 1.0, EPOCHS, SPE)
    temp = np.concatenate((np.linspace(0.04, 0.07, 3), np.ones(EPOCHS - 3) * 0.07))
    for step in range(EPOCHS * SPE):
        v = clock.at(step)
        assert v.lr == pytest.approx(lr[step], rel=1e-12, abs=1e-15)
        assert v.weight_decay == pytest.approx(wd[step], rel=1e-12)
        assert v.momentum == pytest.approx(momentum[step], rel=1e-12)
        assert v.teacher_temperature == pytest.approx(temp[step // SPE], rel=1e-12)
        assert v.last_layer_frozen == (step // SPE < 1)  # DINO: epoch < freeze_last_layer
        assert v.weights == {"dino": 1.0} and v.stage.name == "all" and v.epoch == step // SPE


def test_dinov2_warms_the_temperature_up_per_iteration_and_freezes_the_last_layer_in_steps():
    clock = Clock(OPTIM, teacher("step"), {"dino": TermTiming(1.0)}, total_steps=EPOCHS * SPE,
                  steps_per_epoch=SPE, global_batch=BATCH)
    temp = np.concatenate((np.linspace(0.04, 0.07, 3 * SPE), np.ones((EPOCHS - 3) * SPE) * 0.07))
    last_layer = cosine_scheduler(1.0, 1.0, EPOCHS, SPE)
    last_layer[:SPE] = 0  # DINOv2's last_layer_lr_schedule.schedule[:freeze_last_layer_epochs * epoch_len] = 0
    for step in range(EPOCHS * SPE):
        v = clock.at(step)
        assert v.teacher_temperature == pytest.approx(temp[step], rel=1e-12)
        assert v.last_layer_frozen == (last_layer[step] == 0)


def test_a_multi_stage_run_gives_each_stage_its_overrides():
    stages = [StageSettings(name="heads", steps=7, frozen=["backbone"], lr_mult=2.0, weights={"gram": 0.0}),
              StageSettings(name="all", epochs=2, warmup_epochs=1),
              StageSettings(name="late", lr_mult=0.5)]
    terms = {"dino": TermTiming(1.0), "gram": TermTiming(2.0, start_step=3, ramp_steps=4)}
    clock = Clock(OPTIM, teacher("epoch"), terms, total_steps=EPOCHS * SPE, steps_per_epoch=SPE,
                  global_batch=BATCH, stages=stages)
    base = cosine_scheduler(0.0005 * BATCH / 256, 1e-6, EPOCHS, SPE, warmup_epochs=2)
    assert [(s.name, s.start, s.end) for s in clock.stages] == [("heads", 0, 7), ("all", 7, 17),
                                                                 ("late", 17, 30)]
    for step in range(EPOCHS * SPE):
        v = clock.at(step)
        if step < 7:
            want_lr, name, frozen = 2.0 * base[step], "heads", ("backbone",)
            want_gram = 0.0  # the stage's override
        elif step < 17:
            ramp = np.linspace(0, 1, SPE)[step - 7] if step - 7 < SPE else 1.0  # the stage's own warm-up
            want_lr, name, frozen = ramp * base[step], "all", ()
            want_gram = 2.0 * min(1.0, (step - 3) / 4)
        else:
            want_lr, name, frozen = 0.5 * base[step], "late", ()
            want_gram = 2.0
        assert v.stage.name == name and v.stage.frozen == frozen
        assert v.lr == pytest.approx(want_lr, rel=1e-12, abs=1e-15)
        assert v.weights == pytest.approx({"dino": 1.0, "gram": want_gram})
        assert v.weight_decay == pytest.approx(cosine_scheduler(0.04, 0.4, EPOCHS, SPE)[step])  # not staged


def test_a_stage_may_hold_the_teacher_momentum_constant():
    """DINOv3's high-resolution adaptation runs its own momentum (0.999): the stage's value replaces
    the run's cosine inside the stage only."""
    stages = [StageSettings(name="main", fraction=0.8), StageSettings(name="high_res", teacher_momentum=0.9)]
    clock = Clock(OPTIM, teacher("epoch"), {"dino": TermTiming(1.0)}, total_steps=EPOCHS * SPE,
                  steps_per_epoch=SPE, global_batch=BATCH, stages=stages)
    momentum = cosine_scheduler(0.996, 1.0, EPOCHS, SPE)
    assert [(s.start, s.end) for s in clock.stages] == [(0, 24), (24, 30)]
    for step in range(EPOCHS * SPE):
        want = momentum[step] if step < 24 else 0.9
        assert clock.at(step).momentum == pytest.approx(want, rel=1e-12)


def test_stages_that_end_early_give_the_rest_to_the_last_and_stages_past_the_end_are_empty():
    assert [(s.start, s.end) for s in place_stages([StageSettings(name="a", steps=3),
                                                   StageSettings(name="b", steps=4)], 10, 5)] == [(0, 3), (3, 10)]
    assert [(s.start, s.end) for s in place_stages([], 10, 5)] == [(0, 10)]
    with pytest.warns(UserWarning, match="stage 'b' starts after the run's 10 steps"):
        cut = place_stages([StageSettings(name="a", steps=10), StageSettings(name="b", steps=2),
                            StageSettings(name="c")], 10, 5)
    assert [(s.start, s.end) for s in cut] == [(0, 10), (10, 10), (10, 10)]


def test_an_early_end_or_a_skip_moves_the_later_stages_up_keeping_their_lengths():
    stages = [StageSettings(name="heads", steps=5, frozen=["backbone"], until_teacher_entropy=0.3),
              StageSettings(name="mid", steps=4, warmup_epochs=0.4), StageSettings(name="all")]
    spans = lambda placed: [(s.start, s.end) for s in placed]  # noqa: E731
    assert spans(place_stages(stages, 20, 5)) == [(0, 5), (5, 9), (9, 20)]
    assert spans(place_stages(stages, 20, 5, {0: 0})) == [(0, 0), (0, 4), (4, 20)]  # skipped
    assert spans(place_stages(stages, 20, 5, {0: 2, 2: 1})) == [(0, 2), (2, 6), (6, 20)]  # the last: to the end
    clock = Clock(OPTIM, teacher("epoch"), {}, total_steps=20, steps_per_epoch=5, global_batch=256, stages=stages)
    assert clock.stage_at(3).name == "heads" and clock.at(3).stage.until_teacher_entropy == 0.3
    assert clock.end_stage(0, 2).name == "mid"  # ended after step 2: step 3 is the next stage's first
    assert clock.stage_lengths == {0: 3}
    assert spans(clock.stages) == [(0, 3), (3, 7), (7, 20)]
    assert clock.lr(3) == 0.0 and clock.lr(4) > 0  # the next stage's own warm-up starts at its new start
    assert clock.end_stage(1, 6).name == "all" and clock.stage_lengths == {0: 3}  # its last step: nothing moves
    assert clock.end_stage(2, 10).name == "all" and spans(clock.stages)[-1] == (7, 20)  # the last never ends early


def test_the_stage_without_a_length_takes_what_the_others_leave_and_absorbs_an_early_end():
    # heads 5, main (no length), high_res 4 of 20 steps: main = 20 - 5 - 4 = 11 steps
    stages = [StageSettings(name="heads", steps=5, until_teacher_entropy=0.3), StageSettings(name="main"),
              StageSettings(name="high_res", steps=4, crops={"global_size": 56})]
    spans = lambda placed: [(s.start, s.end) for s in placed]  # noqa: E731
    assert spans(place_stages(stages, 20, 5)) == [(0, 5), (5, 16), (16, 20)]
    # the warm-up ends after 2 steps or is skipped: main starts sooner, high_res keeps its place
    assert spans(place_stages(stages, 20, 5, {0: 2})) == [(0, 2), (2, 16), (16, 20)]
    assert spans(place_stages(stages, 20, 5, {0: 0})) == [(0, 0), (0, 16), (16, 20)]
    clock = Clock(OPTIM, teacher("epoch"), {}, total_steps=20, steps_per_epoch=5, global_batch=256, stages=stages)
    assert clock.end_stage(0, 1).name == "main" and spans(clock.stages) == [(0, 2), (2, 16), (16, 20)]


def test_the_lr_can_be_held_per_epoch():
    clock = Clock(OPTIM, teacher("epoch"), {}, total_steps=EPOCHS * SPE, steps_per_epoch=SPE,
                  global_batch=256, lr_interval="epoch")
    per_epoch = cosine_scheduler(0.0005, 1e-6, EPOCHS, 1, warmup_epochs=2)
    assert [clock.at(s).lr for s in range(EPOCHS * SPE)] == pytest.approx(np.repeat(per_epoch, SPE))


def test_manual_time_needs_the_epoch_length_for_a_per_step_warm_up_and_says_so():
    t = ManualTime(teacher("step"))
    t.epoch = 1
    with pytest.warns(UserWarning, match="set_run_length"):  # says so, then follows the epochs
        assert t.teacher_temperature() == pytest.approx(0.055)
    t.set_run_length(30, 5)
    t.step = 7
    assert t.teacher_temperature() == pytest.approx(np.linspace(0.04, 0.07, 15)[7])
    assert t.momentum() == pytest.approx(cosine_scheduler(0.996, 1.0, 6, 5)[7])
    epoch_unit = ManualTime(teacher("epoch"))  # per epoch: set_epoch is enough, no length needed
    epoch_unit.epoch = 1
    assert epoch_unit.teacher_temperature() == pytest.approx(0.055)
    assert epoch_unit.momentum() == 0.996  # no run length: the momentum stays at its start
    assert math.isclose(ManualTime(TeacherSettings(warmup_epochs=0, warmup_unit="step", momentum=0.9))
                        .teacher_temperature(), 0.07)
