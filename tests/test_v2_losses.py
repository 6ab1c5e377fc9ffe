"""DINOv2/v3 loss terms against independent formulas: Sinkhorn-Knopp, iBOT, KoLeo, Gram."""

from __future__ import annotations

import math

import pytest
import torch

from dinokit.losses import IBOTPatchLoss, gram_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp
from dinokit.losses.ibot import masked_token_weights


def sk_reference(logits, temp, iters):
    """SwAV's few-line algorithm in float64, no max shift."""
    q = torch.exp(logits.double() / temp).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(1, keepdim=True)
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b
    return (q * b).t()


def test_sinkhorn_matches_reference_and_marginals():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=g)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.5, 3).double(), sk_reference(logits, 0.5, 3),
                               rtol=1e-5, atol=1e-6)
    q = sinkhorn_knopp(logits, 0.5, 200)
    torch.testing.assert_close(q.sum(1), torch.ones(12))
    torch.testing.assert_close(q.sum(0), torch.full((5,), 12 / 5), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(sinkhorn_knopp(logits + 7.0, 0.5), sinkhorn_knopp(logits, 0.5))
    assert torch.isfinite(sinkhorn_knopp(logits * 1000, 0.04)).all()
    with pytest.raises(ValueError, match="M, K"):
        sinkhorn_knopp(torch.randn(2, 3, 4), 0.1)


def test_ibot_hand_computed_and_weighting():
    # 4 crops, 3 patches, K=2. Crop 0: patch 1 masked; crop 1: patches 0 and 2; crops 2, 3: none.
    masks = torch.tensor([[False, True, False], [True, False, True], [False] * 3, [False] * 3])
    s = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, math.log(3)]])  # masked tokens in order
    t = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    weights = masked_token_weights(masks)
    assert weights.tolist() == [1.0, 0.5, 0.5]
    loss = ibot_patch_loss(s, t, weights, n_crops=4, student_temp=1.0)
    h0 = math.log(2)  # crop 0, one token
    h1 = 0.5 * (-(0.5 * math.log(0.75) + 0.5 * math.log(0.25))) + 0.5 * (-math.log(0.75))
    # divided by ALL 4 global crops (official forward_masked), not by the 2 masked ones
    assert loss.item() == pytest.approx((h0 + h1) / 4, rel=1e-6)
    # the module's older (s, t, masks) form: same value
    assert IBOTPatchLoss(2, student_temp=1.0)(s, t, masks).item() == pytest.approx((h0 + h1) / 4, rel=1e-6)


def test_ibot_padding_rows_contribute_exactly_zero():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g).softmax(-1)
    w = torch.tensor([0.5, 0.5, 1.0, 0.0, 0.0])
    base = ibot_patch_loss(s[:3], t[:3], w[:3], 4)
    s2, t2 = s.clone(), t.clone()
    s2[3:] = 1e30  # garbage but finite
    t2[3:] = 7.0
    s2.requires_grad_()
    loss = ibot_patch_loss(s2, t2, w, 4)
    assert loss.item() == base.item()
    loss.backward()
    assert torch.all(s2.grad[3:] == 0) and torch.isfinite(s2.grad).all()
    assert ibot_patch_loss(s, t, torch.zeros(5), 4).item() == 0.0
    with pytest.raises(ValueError, match="weights"):
        ibot_patch_loss(s, t, w[:4], 4)


def test_koleo_on_a_circle_and_edge_cases():
    ang = torch.tensor([0.0, 0.3, 1.0, 2.5])
    x = torch.stack([ang.cos(), ang.sin()], 1) * 5.0
    chord = lambda a: 2 * math.sin(a / 2)  # noqa: E731
    nn = [0.3, 0.3, 0.7, 1.5]  # nearest angular gaps
    want = -sum(math.log(chord(a) + 1e-8) for a in nn) / 4
    assert koleo_loss(x).item() == pytest.approx(want, rel=1e-5)
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert torch.isfinite(koleo_loss(dup))
    one = torch.randn(1, 3, requires_grad=True)
    loss = koleo_loss(one)
    loss.backward()
    assert loss.item() == 0.0 and one.grad is not None
    p = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]], requires_grad=True)
    before = koleo_loss(p)
    before.backward()
    with torch.no_grad():
        q = p - 0.05 * p.grad
    assert koleo_loss(q) < before  # a gradient step spreads the points


def test_gram_loss():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 5, 4, generator=g)
    assert gram_loss(a, a.clone()).item() == 0.0
    assert gram_loss(a, a * torch.rand(2, 5, 1, generator=g) + 0.0).item() == pytest.approx(0.0, abs=1e-10)
    b = torch.randn(2, 5, 4, generator=g)
    assert gram_loss(a, b) > 0
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    y = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert gram_loss(x, y).item() == pytest.approx(0.5)  # off-diagonals 0 vs 1: (0+1+1+0)/4
    s = a.clone().requires_grad_()
    t = b.clone().requires_grad_()
    gram_loss(s, t).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="must both be"):
        gram_loss(a, b[:, :3])


def test_sinkhorn_padding_gets_no_mass_and_does_not_count_in_b():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 4, generator=g)
    padded = torch.cat([logits, torch.full((3, 4), float("nan")), torch.full((2, 4), 1e6)])
    valid = torch.arange(12) < 7
    valid[7:10] = False
    q = sinkhorn_knopp(padded, 0.3, 3, valid=valid)
    torch.testing.assert_close(q[:7], sinkhorn_knopp(logits, 0.3, 3))
    assert torch.equal(q[7:], torch.zeros(5, 4))
    torch.testing.assert_close(q[:7].sum(0), sk_reference(logits, 0.3, 3).float().sum(0))
    with pytest.raises(ValueError, match="valid"):
        sinkhorn_knopp(logits, 0.3, valid=torch.ones(6, dtype=torch.bool))


def test_gram_options_and_errors():
    x = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # cosine -1 between the two patches
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # cosine 0
    assert gram_loss(x, y).item() == pytest.approx(0.5)  # off-diagonals -1 vs 0: (1 + 1) / 4
    assert gram_loss(x, y, remove_neg=True).item() == 0.0  # student -1 clamped to 0
    assert gram_loss(y, x, remove_only_teacher_neg=True).item() == 0.0
    assert gram_loss(x, y, img_level=False).item() == pytest.approx(0.5)  # one image: same matrix
    with pytest.raises(ValueError, match="exclusive"):
        gram_loss(x, y, remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError, match="img_level"):
        gram_loss(x[0], y[0])
    assert gram_loss(x[0], y[0], img_level=False).item() == pytest.approx(0.5)


def test_resample_patch_grid_keeps_constant_fields_and_names_bad_grids():
    from dinokit.losses.gram import resample_patch_grid

    const = torch.ones(2, 36, 3) * torch.tensor([1.0, -2.0, 0.5])
    out = resample_patch_grid(const, (6, 6), (4, 4))
    assert out.shape == (2, 16, 3)
    torch.testing.assert_close(out, torch.ones(2, 16, 3) * torch.tensor([1.0, -2.0, 0.5]))
    assert resample_patch_grid(const, (6, 6), (6, 6)) is const
    with pytest.raises(ValueError, match="src_grid"):
        resample_patch_grid(const, (5, 5), (4, 4))


def test_koleo_sum_over_crops_checks_its_shape():
    from dinokit.losses.koleo import koleo_loss_over_crops

    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(koleo_loss_over_crops(x), koleo_loss(x[0]) + koleo_loss(x[1]))
    with pytest.raises(ValueError, match="n_global, B, D"):
        koleo_loss_over_crops(x[0])
