"""The DINO loss (Caron et al. 2021, Eq. 1 and 3), centring (Eq. 4) and collapse diagnostics,
checked against hand-computed numbers and an independent reference written here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dinokit.losses.dino import DINOLoss, collapse_status, n_pairs, teacher_diagnostics


def reference_loss(student_logits, teacher_logits, center, tau_s, tau_t):
    """Plain double loop over (teacher view, student view) pairs, float64, same view skipped."""
    s = student_logits.double()
    t = teacher_logits.double()
    total, pairs = 0.0, 0
    for it in range(t.shape[0]):
        p_t = torch.softmax((t[it] - center.double()) / tau_t, dim=-1)
        for js in range(s.shape[0]):
            if js == it:
                continue
            log_p_s = torch.log_softmax(s[js] / tau_s, dim=-1)
            total += (-(p_t * log_p_s).sum(-1)).mean()
            pairs += 1
    return total / pairs


def test_hand_computed_two_views():
    # K=2, B=1, 2 global views; tau_s = 1, tau_t = 1, centre 0.
    # teacher view 0 logits (0, ln 3) -> p = (1/4, 3/4); student view 1 logits (0, 0) -> log 1/2.
    # teacher view 1 logits (0, 0) -> p = (1/2, 1/2); student view 0 logits (ln 3, 0) -> (3/4, 1/4).
    teacher = torch.tensor([[[0.0, math.log(3)]], [[0.0, 0.0]]])
    student = torch.tensor([[[math.log(3), 0.0]], [[0.0, 0.0]]])
    loss_fn = DINOLoss(2, student_temp=1.0)
    loss = loss_fn(student, loss_fn.teacher_probs(teacher, 1.0))
    h01 = math.log(2)  # -(1/4 ln 1/2 + 3/4 ln 1/2)
    h10 = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert loss.item() == pytest.approx((h01 + h10) / 2, rel=1e-6)


GRID = [c for c in itertools.product([1, 3], [1, 2], [0, 1, 4], [0.1, 0.2], [0.04, 0.07])
        if c[1] + c[2] >= 2]  # the loss needs two views


@pytest.mark.parametrize(("b", "n_global", "n_local", "tau_s", "tau_t"), GRID)
def test_matches_reference_over_a_grid(b, n_global, n_local, tau_s, tau_t):
    g = torch.Generator().manual_seed(b * 100 + n_global * 10 + n_local)
    k = 7
    teacher = torch.randn(n_global, b, k, generator=g)
    student = torch.randn(n_global + n_local, b, k, generator=g)
    loss_fn = DINOLoss(k, student_temp=tau_s)
    loss_fn.centering.center.copy_(torch.randn(k, generator=g) * 0.1)
    got = loss_fn(student, loss_fn.teacher_probs(teacher, tau_t))
    want = reference_loss(student, teacher, loss_fn.center, tau_s, tau_t)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_number_of_pairs():
    assert n_pairs(2, 10) == 18  # 2 globals + 8 locals
    assert n_pairs(2, 2) == 2 and n_pairs(1, 5) == 4
    loss_fn = DINOLoss(4)
    with pytest.raises(ValueError, match="at least two views"):
        loss_fn(torch.randn(1, 2, 4), torch.softmax(torch.randn(1, 2, 4), -1))


def test_centre_update_is_an_exact_ema_of_the_batch_mean():
    loss_fn = DINOLoss(2, center_momentum=0.9)
    loss_fn.update_center(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))  # mean (2, 3)
    torch.testing.assert_close(loss_fn.center, torch.tensor([0.2, 0.3]))
    loss_fn.update_center(torch.tensor([[[0.0, 0.0]], [[4.0, -2.0]]]))  # mean (2, -1)
    torch.testing.assert_close(loss_fn.center, torch.tensor([0.9 * 0.2 + 0.2, 0.9 * 0.3 - 0.1]))


def test_centring_shifts_the_teacher_distribution():
    loss_fn = DINOLoss(2)
    loss_fn.centering.center.copy_(torch.tensor([1.0, 0.0]))
    p = loss_fn.teacher_probs(torch.tensor([[[1.0, 0.0]]]), 0.5)
    torch.testing.assert_close(p, torch.tensor([[[0.5, 0.5]]]))
    with pytest.raises(ValueError, match="teacher temperature"):
        loss_fn.teacher_probs(torch.zeros(1, 1, 2), 0.0)


def test_diagnostics_name_both_collapses():
    k = 8
    uniform = torch.full((2, 4, k), 1 / k)
    d = teacher_diagnostics(uniform)
    assert d.entropy.item() == pytest.approx(math.log(k), rel=1e-5)
    assert d.kl_uniform.item() == pytest.approx(0.0, abs=1e-6)
    assert collapse_status(math.log(k), d.entropy.item(), d.kl_uniform.item(), k).startswith("uniform")
    onehot = torch.zeros(2, 4, k)
    onehot[..., 3] = 1
    d = teacher_diagnostics(onehot)
    assert d.entropy.item() == pytest.approx(0.0, abs=1e-6)
    assert d.kl_uniform.item() == pytest.approx(math.log(k), rel=1e-5)
    assert "one-prototype" in collapse_status(0.1, 0.0, d.kl_uniform.item(), k)
    assert collapse_status(1.0, 1.0, 0.5, k) == "ok"


def test_shape_errors_name_the_shapes():
    loss_fn = DINOLoss(4)
    with pytest.raises(ValueError, match=r"\(3, 2, 5\)"):
        loss_fn(torch.randn(3, 2, 5), torch.randn(2, 2, 4).softmax(-1))
    with pytest.raises(ValueError, match="n_views, B, K"):
        loss_fn(torch.randn(2, 4), torch.randn(2, 2, 4))
