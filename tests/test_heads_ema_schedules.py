"""DINO head (weight-normalised prototypes, last-layer freezing), EMA update and schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinokit.ema import EMAUpdater, make_teacher
from dinokit.heads import DINOHead
from dinokit.schedules import CosineSchedule, TeacherTemperature, linear_ramp, scaled_lr


def test_head_architecture_and_init():
    head = DINOHead(384)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 2048), (2048, 2048), (2048, 256)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.mlp)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in DINOHead(8, 16, 32, 8, use_bn=True).mlp) == 2
    w = linears[1].weight
    # trunc_normal_(std=0.02) as in DINO (cut at +-2 absolute, i.e. effectively a normal)
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and abs(w.mean().item()) < 1e-3
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)
    assert head.last_layer.weight_v.shape == (65536, 256)


def test_logits_are_cosines_to_the_prototypes_when_the_gain_is_fixed():
    torch.manual_seed(0)
    head = DINOHead(6, out_dim=5, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(3, 6)
    z = F.normalize(head.mlp(x), dim=-1)
    cos = z @ F.normalize(head.last_layer.weight_v, dim=1).T
    torch.testing.assert_close(head(x), cos)
    assert head(x).abs().max() <= 1.0 + 1e-6


def test_fixed_versus_trainable_gain():
    fixed = DINOHead(4, 3, 8, 4, norm_last_layer=True)
    free = DINOHead(4, 3, 8, 4, norm_last_layer=False)
    assert not fixed.last_layer.weight_g.requires_grad and free.last_layer.weight_g.requires_grad
    for head in (fixed, free):
        opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
        head(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    assert torch.equal(fixed.last_layer.weight_g, torch.ones(3, 1))
    assert not torch.equal(free.last_layer.weight_g, torch.ones(3, 1))


def test_cancelled_last_layer_is_not_updated():
    head = DINOHead(4, 3, 8, 4, norm_last_layer=False)
    before_last = head.last_layer.weight_v.clone()
    before_mlp = head.mlp[0].weight.clone()
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.5)
    head(torch.randn(5, 4)).pow(2).sum().backward()
    head.cancel_last_layer_gradients()
    opt.step()
    assert torch.equal(head.last_layer.weight_v, before_last)  # no update, no weight decay
    assert not torch.equal(head.mlp[0].weight, before_mlp)


def test_one_ema_step_moves_the_teacher_by_exactly_one_minus_m():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student(torch.randn(8, 3))  # moves the BN running statistics
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    EMAUpdater(teacher, student)(0.9)
    for name, p in student.named_parameters():
        got = teacher.state_dict()[name] - before[name]
        torch.testing.assert_close(got, 0.1 * (p.detach() - before[name]))
    torch.testing.assert_close(teacher[1].running_mean, student[1].running_mean)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_ema_edge_cases():
    student = nn.Linear(2, 2)
    teacher = make_teacher(student)
    with torch.no_grad():
        student.weight.add_(1.0)
    EMAUpdater(teacher, student)(1.0)
    assert not torch.equal(teacher.weight, student.weight)
    with pytest.raises(ValueError, match="momentum"):
        EMAUpdater(teacher, student)(1.5)
    with pytest.raises(ValueError, match="differ in parameters"):
        EMAUpdater(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))


def test_cosine_schedule_values():
    s = CosineSchedule(base=1.0, final=0.0, total_steps=110, warmup_steps=10, warmup_start=0.0)
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)  # half-way through the cosine
    assert s(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == 0.0 and s(500) == 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineSchedule(1.0, 0.0, 10, warmup_steps=20)


def test_dino_schedules():
    wd = CosineSchedule(0.04, 0.4, 1000)
    assert wd(0) == pytest.approx(0.04) and wd(500) == pytest.approx(0.22) and wd(1000) == pytest.approx(0.4)
    m = CosineSchedule(0.996, 1.0, 1000)
    assert m(0) == pytest.approx(0.996) and m(1000) == 1.0 and m(500) == pytest.approx(0.998)
    t = TeacherTemperature(0.04, 0.07, 30)
    assert [t(0), t(15), t(30), t(100)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        TeacherTemperature(0.0, 0.07, 30)
    assert scaled_lr(0.0005, 1024) == pytest.approx(0.002)
    assert scaled_lr(0.004, 256, "sqrt", 1024) == pytest.approx(0.002)
    with pytest.raises(ValueError, match="scaling rule"):
        scaled_lr(0.1, 256, "cubic")
    assert [linear_ramp(s, 10, 10, 2.0) for s in (0, 10, 15, 20, 99)] == [0.0, 0.0, 1.0, 2.0, 2.0]
