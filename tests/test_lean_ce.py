"""The memory-lean DINO and iBOT cross-entropies equal the plain autograd formulas (value and
gradient), written here independently from the papers' definitions."""

from __future__ import annotations

import pytest
import torch

from dinokit.losses import dino_cross_entropy, ibot_patch_loss
from dinokit.losses.lean_ce import _DINOCrossEntropy, _WeightedRowCrossEntropy


def _dino_reference(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """Caron et al. Eq. 3: mean over pairs (t != s) of mean_b H(P_t, softmax(s / tau))."""
    losses = []
    for i in range(t.shape[0]):
        for j in range(s.shape[0]):
            if i != j:
                losses.append(-(t[i] * torch.log_softmax(s[j].float() / tau, -1)).sum(-1).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("n_t,n_s,dtype", [(2, 6, torch.float32), (2, 2, torch.float32), (1, 3, torch.float32),
                                           (2, 5, torch.bfloat16)])
def test_dino_lean_matches_autograd(n_t, n_s, dtype):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n_s, 4, 50, generator=g) * 3).to(dtype).requires_grad_()
    t = torch.softmax(torch.randn(n_t, 4, 50, generator=g) / 0.05, -1)
    ref = _dino_reference(s, t, 0.1)
    (g_ref,) = torch.autograd.grad(ref, s)
    calls = []
    orig = _DINOCrossEntropy.apply
    _DINOCrossEntropy.apply = lambda *a: calls.append(1) or orig(*a)
    try:
        out = dino_cross_entropy(s, t, 0.1)
    finally:
        _DINOCrossEntropy.apply = orig
    assert calls == [1]  # the lean path ran
    (g_out,) = torch.autograd.grad(out, s)
    assert g_out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(g_out.float(), g_ref.float(), **tol)


def test_dino_teacher_with_gradient_falls_back_to_autograd():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 3, 20, generator=g, requires_grad=True)
    logits = torch.randn(2, 3, 20, generator=g, requires_grad=True)
    t = torch.softmax(logits / 0.04, -1)
    out = dino_cross_entropy(s, t, 0.1)
    ref = _dino_reference(s, t, 0.1)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, logits, retain_graph=True)[0],
                               torch.autograd.grad(ref, logits)[0])


@pytest.mark.parametrize("chunk", [3, None])
def test_ibot_lean_matches_autograd_with_padding(chunk):
    g = torch.Generator().manual_seed(2)
    u, k = 11, 40
    s = (torch.randn(u, k, generator=g) * 2).requires_grad_()
    t = torch.softmax(torch.randn(u, k, generator=g) / 0.07, -1)
    w = torch.rand(u, generator=g) + 0.1
    w[-3:] = 0.0  # padding rows
    t = torch.where(w[:, None] != 0, t, 0.0)
    ref = -(w * (t * torch.log_softmax(s / 0.1, -1)).sum(-1)).sum() / 6
    (g_ref,) = torch.autograd.grad(ref, s)
    orig = _WeightedRowCrossEntropy.forward
    seen = []

    def spy(ctx, *a):
        seen.append(a[-1])
        return orig(ctx, *a)

    _WeightedRowCrossEntropy.forward = staticmethod(spy)
    try:
        from dinokit.losses import lean_ce

        out = lean_ce.weighted_row_cross_entropy_sum(s, t, w, 0.1, chunk=chunk) / 6
        default = ibot_patch_loss(s, t, w, 6, 0.1)
    finally:
        _WeightedRowCrossEntropy.forward = staticmethod(orig)
    assert seen == [chunk or (1 << 24) // k, (1 << 24) // k]  # explicit chunk, then the default
    (g_out,) = torch.autograd.grad(out, s)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(default, ref)
    torch.testing.assert_close(g_out, g_ref)
    assert g_out[-3:].abs().sum() == 0
