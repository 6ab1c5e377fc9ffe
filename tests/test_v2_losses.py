"""DINOv2/v3 loss terms against independent formulas: Sinkhorn-Knopp, iBOT, KoLeo, Gram."""

from __future__ import annotations

import math

import pytest
import torch

from dinokit.losses import gram_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp


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
    # 2 images, 3 patches, K=2. Image 0: patch 1 masked; image 1: patches 0 and 2 masked.
    masks = torch.tensor([[False, True, False], [True, False, True]])
    s = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, math.log(3)]])  # masked tokens in order
    t = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    loss = ibot_patch_loss(s, t, masks, student_temp=1.0)
    h0 = math.log(2)  # image 0, one token
    h1 = 0.5 * (-(0.5 * math.log(0.75) + 0.5 * math.log(0.25))) + 0.5 * (-math.log(0.75))
    assert loss.item() == pytest.approx((h0 + h1) / 2, rel=1e-6)


def test_ibot_ignores_unmasked_tokens_and_handles_no_masks():
    g = torch.Generator().manual_seed(1)
    s_all, t_all = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g).softmax(-1)
    masks = torch.tensor([[True, False, True, False], [False, False, False, True]])
    base = ibot_patch_loss(s_all[masks], t_all[masks], masks)
    s2, t2 = s_all.clone(), t_all.clone()
    s2[~masks] += 100.0
    t2[~masks] = t2[~masks].flip(-1)
    assert ibot_patch_loss(s2[masks], t2[masks], masks).item() == pytest.approx(base.item())
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert ibot_patch_loss(s_all[none], t_all[none], none).item() == 0.0


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
