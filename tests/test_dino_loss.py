"""The DINO loss (Caron et al. 2021, Eq. 1 and 3), the teacher centring (Eq. 4) and the collapse
diagnostics, pinned to hand-computed numbers and to an independent float64 reference written here.

Paper: ``L = mean over pairs (t, s), t a global view, s any view != t, of H(P_t, P_s)`` with
``P_s = softmax(g_s / tau_s)``, ``P_t = softmax((g_t - c) / tau_t)``, ``H(a, b) = -sum_k a_k log b_k``,
averaged over the batch; ``c <- m c + (1 - m) mean(g_t)`` with ``m = 0.9``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dinokit.losses.dino import DINOLoss, collapse_status, n_pairs, teacher_diagnostics

LN2, LN3 = math.log(2), math.log(3)


def reference_loss(student_logits, teacher_logits, center, tau_s, tau_t):
    """Explicit double loop over (teacher view, student view) pairs in float64, same view skipped.

    Returns the loss and the number of pairs used.
    """
    s, t, c = student_logits.double(), teacher_logits.double(), center.double()
    total, pairs = 0.0, 0
    for it in range(t.shape[0]):
        p_t = torch.softmax((t[it] - c) / tau_t, dim=-1)
        for js in range(s.shape[0]):
            if js == it:  # a view is never compared with itself
                continue
            log_p_s = torch.log_softmax(s[js] / tau_s, dim=-1)
            total = total + (-(p_t * log_p_s).sum(-1)).mean()  # mean over the batch
            pairs += 1
    return total / pairs, pairs


def _ln(*weights):
    return torch.log(torch.tensor(weights, dtype=torch.float32))


def _loss(student_logits, teacher_logits, center, tau_s, tau_t):
    fn = DINOLoss(student_logits.shape[-1], student_temp=tau_s)
    fn.centering.center.copy_(center)
    return fn(student_logits, fn.teacher_probs(teacher_logits, tau_t))


def test_hand_computed_example_k3_b1_two_views():
    """K=3, B=1, two global views, tau_s=0.1, tau_t=0.04, centre c=(0.5, -0.2, 0.1).

    Logits are chosen so that the distributions are simple fractions:
      P_t0 = (1/2, 1/4, 1/4)   P_t1 = (1/3, 1/3, 1/3)      (teacher, after centring)
      P_s0 = (1/4, 1/4, 1/2)   P_s1 = (1/2, 1/4, 1/4)      (student)
    Cross-view pairs only: (t0, s1) and (t1, s0).
      H(P_t0, P_s1) = 1/2 ln 2 + 1/4 ln 4 + 1/4 ln 4 = 3/2 ln 2
      H(P_t1, P_s0) = 1/3 (ln 4 + ln 4 + ln 2)       = 5/3 ln 2
      L = (3/2 + 5/3) / 2 ln 2 = 19/12 ln 2 ~= 1.0975
    (With the same-view pairs H(t0,s0) = 7/4 ln 2 and H(t1,s1) = 5/3 ln 2 included it would be
    79/48 ln 2; without centring or with the temperatures swapped it would differ as well.)
    """
    tau_s, tau_t = 0.1, 0.04
    c = torch.tensor([0.5, -0.2, 0.1])
    # logits tau * ln(w) give softmax(logits / tau) = w / sum(w)
    teacher = torch.stack([c + tau_t * _ln(2, 1, 1), c + tau_t * _ln(1, 1, 1)])[:, None]
    student = torch.stack([tau_s * _ln(1, 1, 2), tau_s * _ln(2, 1, 1)])[:, None]

    loss = _loss(student, teacher, c, tau_s, tau_t)

    assert loss.item() == pytest.approx(19 / 12 * LN2, rel=1e-6)
    assert loss.item() != pytest.approx(79 / 48 * LN2, rel=1e-3)  # the same-view version


GRID = [
    combo
    for combo in itertools.product([1, 3], [1, 2], [0, 1, 4], [0.1, 0.2], [0.04, 0.07])
    if combo[1] + combo[2] >= 2  # the loss needs two views (see test_one_view_is_an_error)
]


@pytest.mark.parametrize(("batch", "n_global", "n_local", "tau_s", "tau_t"), GRID)
def test_matches_the_reference_double_loop(batch, n_global, n_local, tau_s, tau_t):
    """Batched loss == float64 double loop, for every batch size, crop count and temperature."""
    g = torch.Generator().manual_seed(1000 * batch + 100 * n_global + n_local)
    k = 7
    teacher = torch.randn(n_global, batch, k, generator=g)
    student = torch.randn(n_global + n_local, batch, k, generator=g)
    center = 0.3 * torch.randn(k, generator=g)

    got = _loss(student, teacher, center, tau_s, tau_t)
    want, pairs = reference_loss(student, teacher, center, tau_s, tau_t)

    assert pairs == n_global * (n_global + n_local) - n_global == n_pairs(n_global, n_global + n_local)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_two_globals_and_eight_locals_make_18_pairs():
    """2 globals + 8 locals: 2 * 10 - 2 = 18 pairs, and the loss is their plain mean.

    K=3, B=1. Teacher view t is one-hot on prototype t (probabilities given directly). Student:
    view 0 = (0.9, 0.05, 0.05), view 1 = (0.05, 0.9, 0.05), the 8 locals uniform (1/3 each).
    Cross pairs: H(t0, s1) = -ln 0.05 = ln 20, H(t1, s0) = ln 20, 16 pairs with a local = ln 3.
    L = (2 ln 20 + 16 ln 3) / 18.
    """
    assert n_pairs(2, 10) == 18
    tau_s = 0.1
    teacher_probs = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    probs = [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]] + [[1 / 3] * 3] * 8
    student = tau_s * torch.log(torch.tensor(probs))[:, None]  # softmax(student / tau_s) == probs

    loss = DINOLoss(3, student_temp=tau_s)(student, teacher_probs)

    assert loss.item() == pytest.approx((2 * math.log(20) + 16 * LN3) / 18, rel=1e-5)
    with_same_view = (2 * math.log(20) - 2 * math.log(0.9) + 16 * LN3) / 20
    assert loss.item() != pytest.approx(with_same_view, rel=1e-3)


def test_one_view_is_an_error():
    """1 global + 0 locals leaves no cross-view pair: a clear error, not a NaN (0/0)."""
    fn = DINOLoss(4)
    with pytest.raises(ValueError, match="at least two views"):
        fn(torch.randn(1, 2, 4), torch.softmax(torch.randn(1, 2, 4), -1))


def test_centre_is_an_exact_ema_of_the_teacher_mean():
    """c <- 0.9 c + 0.1 mean over every view and sample of the teacher logits, twice by hand.

    Step 1: c = 0, logits of 1 view x 2 samples (1, 2, 3), (3, 4, -1): mean (2, 3, 1)
            -> c = 0.1 * (2, 3, 1) = (0.2, 0.3, 0.1)
    Step 2: logits of 2 views x 1 sample (0, 0, 0), (4, -2, 10): mean (2, -1, 5)
            -> c = 0.9 * (0.2, 0.3, 0.1) + 0.1 * (2, -1, 5) = (0.38, 0.17, 0.59)
    """
    fn = DINOLoss(3, center_momentum=0.9)
    assert torch.equal(fn.center, torch.zeros(3))
    fn.update_center(torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, -1.0]]]))
    torch.testing.assert_close(fn.center, torch.tensor([0.2, 0.3, 0.1]))
    fn.update_center(torch.tensor([[[0.0, 0.0, 0.0]], [[4.0, -2.0, 10.0]]]))
    torch.testing.assert_close(fn.center, torch.tensor([0.38, 0.17, 0.59]))


def test_centring_is_subtracted_before_sharpening():
    """P_t = softmax((g - c) / tau_t). Logits (1, 0), tau_t = 0.5:
    with c = (1, 0) the teacher is uniform (1/2, 1/2); with c = 0 it is softmax(2, 0) =
    (e^2, 1) / (e^2 + 1) ~= (0.881, 0.119); with c = (0, 1) it is softmax(2, -2)."""
    fn = DINOLoss(2)
    logits = torch.tensor([[[1.0, 0.0]]])
    e2 = math.exp(2)
    torch.testing.assert_close(fn.teacher_probs(logits, 0.5), torch.tensor([[[e2 / (e2 + 1), 1 / (e2 + 1)]]]))
    fn.centering.center.copy_(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(fn.teacher_probs(logits, 0.5), torch.tensor([[[0.5, 0.5]]]))
    fn.centering.center.copy_(torch.tensor([0.0, 1.0]))
    e4 = math.exp(4)
    torch.testing.assert_close(fn.teacher_probs(logits, 0.5), torch.tensor([[[e4 / (e4 + 1), 1 / (e4 + 1)]]]))
    with pytest.raises(ValueError, match="teacher temperature must be > 0"):
        fn.teacher_probs(logits, 0.0)


def test_diagnostics_of_a_uniform_teacher():
    """Uniform collapse: every image gets (1/K, ..., 1/K): entropy ln K, KL(mean || uniform) 0."""
    k = 8
    d = teacher_diagnostics(torch.full((2, 4, k), 1 / k))
    assert d.entropy.item() == pytest.approx(math.log(k), rel=1e-6)
    assert d.kl_uniform.item() == pytest.approx(0.0, abs=1e-6)


def test_diagnostics_of_a_one_prototype_teacher():
    """One-prototype collapse: every image one-hot on the same prototype: entropy 0, KL ln K."""
    k = 8
    onehot = torch.zeros(2, 4, k)
    onehot[..., 3] = 1
    d = teacher_diagnostics(onehot)
    assert d.entropy.item() == pytest.approx(0.0, abs=1e-6)
    assert d.kl_uniform.item() == pytest.approx(math.log(k), rel=1e-6)


def test_diagnostics_of_a_healthy_teacher():
    """Confident per image but spread over prototypes (one-hot on different ones): entropy 0 and
    KL 0, which is what distinguishes health from the one-prototype collapse above."""
    d = teacher_diagnostics(torch.eye(4)[None])  # 4 images, each on its own prototype
    assert d.entropy.item() == pytest.approx(0.0, abs=1e-6)
    assert d.kl_uniform.item() == pytest.approx(0.0, abs=1e-6)


def test_collapse_status_names_each_case():
    k = 64
    ln_k = math.log(k)
    assert collapse_status(ln_k, ln_k, 0.0, k).startswith("uniform collapse")
    assert collapse_status(0.5, 0.0, ln_k, k).startswith("one-prototype collapse")
    assert collapse_status(2.0, 0.5, 0.2, k) == "ok"
    # uniform collapse needs both pinned at ln K: a sharp teacher whose loss happens to sit near
    # ln K is not one, nor is a flat teacher early on while the student is still far from flat
    assert collapse_status(ln_k, 0.5, 0.2, k) == "ok"
    assert collapse_status(2 * ln_k, ln_k, 0.0, k) == "ok"


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "message"),
    [
        ((3, 2, 5), (2, 2, 4), r"\(3, 2, 5\) and teacher_probs \(2, 2, 4\)"),  # K differs
        ((3, 4, 5), (2, 2, 5), r"\(3, 4, 5\) and teacher_probs \(2, 2, 5\)"),  # B differs
        ((2, 5), (2, 2, 5), r"n_views, B, K.*\(2, 5\) and \(2, 2, 5\)"),  # not 3-D
    ],
)
def test_shape_errors_name_the_shapes(student_shape, teacher_shape, message):
    with pytest.raises(ValueError, match=message):
        DINOLoss(5)(torch.randn(student_shape), torch.rand(teacher_shape))


def test_student_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature_student must be > 0"):
        DINOLoss(4, student_temp=0.0)
