"""DINO's schedules (Caron et al. 2021, Sec. 3.1 / Appendix and the official ``cosine_scheduler``):
learning rate linear warm-up then cosine to ~1e-6, weight decay cosine 0.04 -> 0.4, teacher
momentum cosine 0.996 -> 1, teacher temperature linear 0.04 -> 0.07 over 30 epochs, and the linear
learning-rate scaling rule ``lr = 0.0005 * batch / 256``."""

from __future__ import annotations

import math

import pytest

from dinokit.schedules import CosineSchedule, TeacherTemperature, scaled_lr


def cosine(base, final, progress):
    """The half-cosine from ``base`` (progress 0) to ``final`` (progress 1)."""
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


# base 1.0 -> final 0.1 over 110 steps, the first 10 a linear warm-up from 0.2
S = CosineSchedule(base=1.0, final=0.1, total_steps=110, warmup_steps=10, warmup_start=0.2)


def test_warm_up_is_a_linear_ramp_from_start_to_base():
    """step k < 10: np.linspace(0.2, 1.0, 10)[k] = 0.2 + 0.8 * k / 9: base reached at step 9."""
    assert S(0) == pytest.approx(0.2)
    assert S(1) == pytest.approx(0.2 + 0.8 / 9)
    assert S(5) == pytest.approx(0.2 + 0.8 * 5 / 9)
    assert S(9) == 1.0  # end of warm-up: the base value exactly (np.linspace's endpoint)
    assert S(10) == pytest.approx(1.0)  # the cosine starts at base too


def test_cosine_part_follows_the_half_cosine():
    """step 10 + j of 100 cosine steps: 0.1 + 0.45 (1 + cos(pi j / 100))."""
    assert S(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))  # ~0.868
    assert S(60) == pytest.approx(0.55)  # half-way: the mean of base and final
    assert S(85) == pytest.approx(0.1 + 0.45 * (1 - math.sqrt(0.5)))  # ~0.232


def test_final_value_is_reached_exactly_and_held():
    assert S(110) == 0.1
    assert S(111) == 0.1 and S(10_000) == 0.1


def test_without_warm_up_the_cosine_starts_at_base():
    s = CosineSchedule(base=2.0, final=0.0, total_steps=4)
    assert [s(k) for k in range(5)] == pytest.approx([2.0, 1.0 + math.sqrt(0.5), 1.0, 1.0 - math.sqrt(0.5), 0.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(total_steps=0), "total_steps must be >= 1"),
     (dict(total_steps=10, warmup_steps=11), "warmup_steps must be in"),
     (dict(total_steps=10, warmup_steps=-1), "warmup_steps must be in")],
)
def test_bad_lengths_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CosineSchedule(base=1.0, final=0.0, **kwargs)


def test_dino_learning_rate():
    """ViT-S/16, batch 1024: peak 0.0005 * 1024 / 256 = 0.002, linear warm-up from 0 over 10
    epochs, then cosine to 1e-6 (here 100 epochs of 10 steps)."""
    lr = CosineSchedule(base=scaled_lr(0.0005, 1024), final=1e-6, total_steps=1000, warmup_steps=100)
    assert lr(0) == 0.0
    assert lr(50) == pytest.approx(0.002 * 50 / 99)
    assert lr(99) == pytest.approx(0.002)
    assert lr(100) == pytest.approx(0.002)
    assert lr(550) == pytest.approx((0.002 + 1e-6) / 2)
    assert lr(1000) == 1e-6


def test_dino_weight_decay_rises_from_004_to_04():
    wd = CosineSchedule(base=0.04, final=0.4, total_steps=1000)
    assert wd(0) == pytest.approx(0.04)
    assert wd(250) == pytest.approx(cosine(0.04, 0.4, 0.25))  # ~0.0927
    assert wd(500) == pytest.approx(0.22)
    assert wd(1000) == 0.4


def test_dino_teacher_momentum_rises_from_0996_to_1():
    m = CosineSchedule(base=0.996, final=1.0, total_steps=1000)
    assert m(0) == pytest.approx(0.996)
    assert m(500) == pytest.approx(0.998)
    assert m(1000) == 1.0  # exactly 1: the teacher is frozen at the very end


def test_teacher_temperature_warm_up_over_30_epochs():
    """np.linspace(0.04, 0.07, 30) then constant (DINO's ``teacher_temp_schedule``): 0.07 at 29."""
    t = TeacherTemperature(warmup=0.04, final=0.07, warmup_epochs=30)
    assert t(0) == pytest.approx(0.04)
    assert t(10) == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert t(29) == 0.07
    assert t(30) == pytest.approx(0.07)
    assert TeacherTemperature(0.04, 0.07, 30, endpoint=False)(15) == pytest.approx(0.055)  # DINOv3
    assert t(100) == pytest.approx(0.07)
    assert TeacherTemperature(0.04, 0.07, warmup_epochs=0)(0) == pytest.approx(0.07)


@pytest.mark.parametrize(("warmup", "final"), [(0.0, 0.07), (0.04, 0.0), (-0.04, 0.07)])
def test_teacher_temperature_must_be_positive(warmup, final):
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        TeacherTemperature(warmup, final, 30)


def test_linear_lr_scaling():
    """DINO (Goyal et al. 2017): lr = base * batch / 256."""
    assert scaled_lr(0.0005, 1024) == pytest.approx(0.002)
    assert scaled_lr(0.0005, 256) == pytest.approx(0.0005)
    assert scaled_lr(0.0005, 64, "linear") == pytest.approx(0.000125)


def test_sqrt_lr_scaling():
    """DINOv2: lr = base * sqrt(batch / reference)."""
    assert scaled_lr(0.001, 1024, "sqrt") == pytest.approx(0.002)  # reference 256: sqrt(4) = 2
    assert scaled_lr(0.004, 256, "sqrt", reference=1024) == pytest.approx(0.002)
    assert scaled_lr(0.003, 77, "none") == 0.003


def test_bad_scaling_rule_or_batch_is_refused():
    with pytest.raises(ValueError, match="'linear', 'sqrt' or 'none', got 'cubic'"):
        scaled_lr(0.1, 256, "cubic")
    with pytest.raises(ValueError, match="global batch size must be >= 1"):
        scaled_lr(0.1, 0)
