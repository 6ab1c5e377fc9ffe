"""The EMA teacher of DINO (Caron et al. 2021, Sec. 3.1): after every optimiser step
``theta_t <- m theta_t + (1 - m) theta_s``, i.e. each teacher weight moves by exactly ``(1 - m)``
of its gap to the student. dinokit also copies buffers (BatchNorm running statistics)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinokit.ema import EMAUpdater, ema_update_, make_teacher


def _student():
    """Linear + BatchNorm + Linear in float64, so the update can be checked to ~1e-15."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def _diverged_pair():
    """A teacher copy, then a student moved away from it (parameters and BN statistics)."""
    student = _student()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student(torch.randn(8, 3, dtype=torch.float64))  # train mode: moves running_mean/var
    return teacher, student


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_make_teacher_is_a_frozen_copy():
    student = _student()
    teacher = make_teacher(student)
    assert teacher is not student
    for (n, t), s in zip(teacher.named_parameters(), student.parameters()):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr(), n
        assert not t.requires_grad and s.requires_grad


@pytest.mark.parametrize("m", [0.9, 0.996, 0.0])
def test_one_step_moves_each_parameter_by_one_minus_m_of_the_gap(m):
    """t' - t == (1 - m) (s - t) for every parameter (m = 0 copies the student)."""
    teacher, student = _diverged_pair()
    before = _snapshot(teacher)
    EMAUpdater(teacher, student)(m)
    for name, s in student.named_parameters():
        t, t_new = before[name], dict(teacher.named_parameters())[name]
        assert not torch.equal(s, t), name  # there is a gap to close
        torch.testing.assert_close(t_new - t, (1 - m) * (s.detach() - t), rtol=1e-12, atol=1e-14)


def test_momentum_one_leaves_the_teacher_parameters_unchanged():
    teacher, student = _diverged_pair()
    before = _snapshot(teacher)
    EMAUpdater(teacher, student)(1.0)
    for name, t in teacher.named_parameters():
        assert torch.equal(t, before[name]), name


def test_buffers_are_copied_from_the_student():
    """BatchNorm running mean/var/count: copied, not averaged (at any momentum)."""
    teacher, student = _diverged_pair()
    bn_t, bn_s = teacher[1], student[1]
    assert not torch.equal(bn_t.running_mean, bn_s.running_mean)  # the student's stats moved
    ema_update_(teacher, student, 0.9)
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)
    assert torch.equal(bn_t.running_var, bn_s.running_var)
    assert torch.equal(bn_t.num_batches_tracked, bn_s.num_batches_tracked)


def test_repeated_steps_compound():
    """One updater, two steps at m = 0.5: the gap shrinks to 0.5^2 of the original."""
    teacher, student = _diverged_pair()
    gap0 = student[0].weight.detach() - teacher[0].weight
    update = EMAUpdater(teacher, student)
    update(0.5)
    update(0.5)
    torch.testing.assert_close(student[0].weight.detach() - teacher[0].weight, 0.25 * gap0)


def test_parameters_are_paired_by_name_not_by_order():
    """Same names registered in another order: m = 0 copies "a" onto "a", not onto "b"."""
    torch.manual_seed(0)
    teacher = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    student = nn.ModuleDict({"b": nn.Linear(2, 2), "a": nn.Linear(2, 2)})
    EMAUpdater(teacher, student)(0.0)
    assert torch.equal(teacher["a"].weight, student["a"].weight)
    assert torch.equal(teacher["b"].weight, student["b"].weight)


def test_modules_with_different_parameters_are_refused():
    with pytest.raises(ValueError, match="differ in parameters"):
        EMAUpdater(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))


def test_modules_with_different_shapes_are_refused():
    """Same names but other shapes: refused when pairing, naming the parameter and the shapes."""
    with pytest.raises(ValueError, match=r"weight: teacher \(2, 2\) vs student \(3, 2\)"):
        EMAUpdater(nn.Linear(2, 2), nn.Linear(2, 3))


@pytest.mark.parametrize("m", [-0.1, 1.5])
def test_momentum_outside_zero_one_is_refused(m):
    teacher, student = _diverged_pair()
    with pytest.raises(ValueError, match="momentum must be in"):
        EMAUpdater(teacher, student)(m)
