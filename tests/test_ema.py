"""The EMA teacher of DINO (Caron et al. 2021, Sec. 3.1): after every optimiser step
``theta_t <- m theta_t + (1 - m) theta_s``, i.e. each teacher weight moves by exactly ``(1 - m)``
of its gap to the student. Buffers (BatchNorm running statistics) are the teacher's own, as in the
official code."""

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


def test_buffers_are_left_alone_as_the_official_update():
    """Official DINO/DINOv2 move parameters only: the teacher's BatchNorm statistics stay its own."""
    teacher, student = _diverged_pair()
    bn_t, bn_s = teacher[1], student[1]
    before = _snapshot(teacher)
    assert not torch.equal(before["1.running_mean"], bn_s.running_mean)  # the student's stats moved
    ema_update_(teacher, student, 0.9)
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(teacher.state_dict()[k], before[k]), k
    ema_update_(teacher, student, 0.9, copy_buffers=True)  # the non-official option
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)
    assert torch.equal(bn_t.num_batches_tracked, bn_s.num_batches_tracked)


def test_update_follows_the_modules_after_to_float64():
    """Moved after the updater was made (as Lightning does): the update reaches the new tensors."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    teacher = make_teacher(student)
    update = EMAUpdater(teacher, student, copy_buffers=True)
    teacher.to(torch.float64)
    student.to(torch.float64)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student(torch.randn(8, 3, dtype=torch.float64))
    before = _snapshot(teacher)
    update(0.5)
    for name, s in student.named_parameters():
        t = dict(teacher.named_parameters())[name]
        assert t.dtype == torch.float64
        torch.testing.assert_close(t, 0.5 * before[name] + 0.5 * s.detach())
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)  # new buffer objects too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_update_follows_a_device_move():
    torch.manual_seed(0)
    student = nn.Linear(3, 4)
    teacher = make_teacher(student)
    update = EMAUpdater(teacher, student)
    teacher.cuda()
    student.cuda()
    with torch.no_grad():
        student.weight.add_(1.0)
    before = teacher.weight.detach().clone()
    update(0.5)
    torch.testing.assert_close(teacher.weight, 0.5 * before + 0.5 * student.weight.detach())


@pytest.mark.parametrize("flag", [torch.tensor(False), torch.tensor(0.0)])
def test_apply_false_leaves_the_teacher_unchanged(flag):
    teacher, student = _diverged_pair()
    before = _snapshot(teacher)
    update = EMAUpdater(teacher, student)
    update(0.9, apply=flag)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    update(0.9, apply=torch.tensor(True))  # True: the plain update (to rounding)
    reference, _ = _diverged_pair()
    EMAUpdater(reference, student)(0.9)
    for (n, t), r in zip(teacher.named_parameters(), reference.parameters()):
        assert not torch.equal(t, before[n]), n
        torch.testing.assert_close(t, r, rtol=1e-15, atol=1e-15)


def test_update_is_t_times_m_plus_s_times_one_minus_m_as_official():
    """Bit for bit the official ``_foreach_mul_(t, m); _foreach_add_(t, s, alpha=1 - m)``."""
    teacher, student = _diverged_pair()
    t_ref = [p.detach().clone() for p in teacher.parameters()]
    s_ref = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_ref, 0.996)
    torch._foreach_add_(t_ref, s_ref, alpha=1 - 0.996)
    EMAUpdater(teacher, student)(0.996)
    for t, r in zip(teacher.parameters(), t_ref):
        assert torch.equal(t, r)


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


FSDP2_SCRIPT = r"""
import os, socket, torch, torch.distributed as dist
from torch import nn
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from dinokit.ema import EMAUpdater, make_teacher
mesh = init_device_mesh("cpu", (1,))
torch.manual_seed(0)
student = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
teacher = make_teacher(student)
update = EMAUpdater(teacher, student)  # made before sharding: must follow the new DTensor params
fully_shard(student, mesh=mesh)
fully_shard(teacher, mesh=mesh)
assert type(next(teacher.parameters())).__name__ == "DTensor"
with torch.no_grad():
    for p in student.parameters():
        p.add_(1.0)
before = [p.full_tensor().clone() for p in teacher.parameters()]
update(0.5)
for b, t, s in zip(before, teacher.parameters(), student.parameters()):
    torch.testing.assert_close(t.full_tensor(), 0.5 * b + 0.5 * s.full_tensor())
mid = [p.full_tensor().clone() for p in teacher.parameters()]
update(0.5, apply=torch.tensor(False))
assert all(torch.equal(m, t.full_tensor()) for m, t in zip(mid, teacher.parameters()))
update(0.5, apply=torch.tensor(True))
for m, t, s in zip(mid, teacher.parameters(), student.parameters()):
    torch.testing.assert_close(t.full_tensor(), 0.5 * m + 0.5 * s.full_tensor())
dist.destroy_process_group()
print("FSDP2-OK")
"""


def test_update_follows_fsdp2_fully_shard():
    """FSDP2 replaces every Parameter by a DTensor one after the updater was built (CPU, gloo)."""
    import subprocess
    import sys

    pytest.importorskip("torch.distributed.fsdp")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = subprocess.run([sys.executable, "-c", FSDP2_SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert "FSDP2-OK" in out.stdout, out.stderr[-3000:]
