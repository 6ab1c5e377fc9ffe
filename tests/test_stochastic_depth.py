"""Efficient stochastic depth (DINOv2/DINOv3): the residual branch computed on a kept subset of the
samples and added back with ``index_add(..., alpha=b / k)``, pinned to the official formula
(dinov3/layers/block.py ``SelfAttentionBlock._forward``), unbiased, really cheaper, per resolution
run on the packed stream, and reachable from the config."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

import dinokit.backbones.stochastic_depth as sd
from conftest import seed_all, tiny_vit
from dinokit.backbones.stochastic_depth import (
    packed_subset_residual,
    set_uniform_drop_path,
    subset_block,
    subset_residual,
    subset_size,
)
from dinokit.methods.base import forward_views


class Counting(nn.Module):
    """Wraps a module and records the number of rows (samples or packed tokens) it is called on."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.rows = inner, []

    def forward(self, x):
        self.rows.append(x.shape[0] if x.ndim == 2 else x.shape[0] * x.shape[1])
        return self.inner(x)


def _branch(x):  # a per-sample nonlinear branch
    return torch.tanh(x * 1.5 + 0.3) * 2.0


def _views(b: int = 3, gen: int = 0):
    g = torch.Generator().manual_seed(gen)
    return ([torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)],
            [torch.randn(b, 3, 16, 16, generator=g) for _ in range(3)])


def _subset_vit(rate: float = 0.5, depth: int = 2, above: float = 0.0):
    seed_all(0)
    bb = tiny_vit(depth=depth, drop_path_rate=rate)
    set_uniform_drop_path(bb.model.blocks, rate)
    bb.drop_path_mode, bb.drop_path_subset_above = "subset", above
    return bb.train()


def _fixed_draw(n, rate, device, generator=None):
    """Deterministic stand-in for ``draw_subset``: the same indices for the same ``n``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(n))[: subset_size(n, rate)].to(device)


# ------------------------------------------------------------------------------------- the op
def test_subset_size_is_the_official_formula():
    # max(int(b * (1 - ratio)), 1), float rounding included (1 - 0.9 = 0.0999...: 9 of 100, not 10)
    cases = {(10, 0.4): 6, (10, 0.3): 7, (10, 0.7): 3, (8, 0.1): 7, (3, 0.9): 1, (100, 0.9): 9, (5, 0.0): 5,
             (4, 1.0): 1, (64, 0.4): 38}
    assert {k: subset_size(*k) for k in cases} == cases


@pytest.mark.parametrize("b,rate", [(7, 0.4), (10, 0.3), (3, 0.9)])
def test_subset_residual_equals_the_official_formula(b, rate):
    x = torch.randn(b, 5, 4, generator=torch.Generator().manual_seed(1))
    out = subset_residual(x, _branch, rate, generator=torch.Generator().manual_seed(7))
    # reference: DINOv3 SelfAttentionBlock._forward, one branch
    k = max(int(b * (1 - rate)), 1)
    idx = torch.randperm(b, generator=torch.Generator().manual_seed(7))[:k]
    ref = torch.index_add(x, 0, idx, _branch(x[idx]), alpha=b / k)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # by hand: the k kept samples get x + (b / k) * branch(x), the others stay x exactly
    kept = torch.zeros(b, dtype=torch.bool)
    kept[idx] = True
    assert int(kept.sum()) == k
    assert torch.equal(out[~kept], x[~kept])
    torch.testing.assert_close(out[kept], x[kept] + (b / k) * _branch(x[kept]))


def test_subset_block_equals_dinov3_forward():
    seed_all(0)
    blk = Block(16, 2, drop_path=0.4, init_values=0.5).train()
    x = torch.randn(10, 6, 16)
    torch.manual_seed(3)
    out = subset_block(blk, x)
    torch.manual_seed(3)  # reference: DINOv3 _forward, written out with the timm block's parts
    b, k = 10, 6
    i1 = torch.randperm(b)[:k]
    x_attn = torch.index_add(x, dim=0, source=blk.ls1(blk.attn(blk.norm1(x[i1]))), index=i1, alpha=b / k)
    i2 = torch.randperm(b)[:k]
    ref = torch.index_add(x_attn, dim=0, source=blk.ls2(blk.mlp(blk.norm2(x_attn[i2]))), index=i2, alpha=b / k)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(i1, i2)  # each branch has its own draw


def test_eval_mode_and_rate_zero_are_exactly_the_plain_block():
    seed_all(0)
    x = torch.randn(4, 6, 16)
    blk = Block(16, 2, drop_path=0.5).eval()
    assert torch.equal(subset_block(blk, x), blk(x))
    blk0 = Block(16, 2, drop_path=0.0).train()  # rate 0: nothing random, nothing skipped
    assert torch.equal(subset_block(blk0, x), blk0(x))
    assert torch.equal(subset_residual(x, _branch, 0.0), x + _branch(x))
    # DINOv2's threshold: a rate not above it goes through the block's own DropPath
    blk.train()
    torch.manual_seed(5)
    ref = blk(x)
    torch.manual_seed(5)
    assert torch.equal(subset_block(blk, x, subset_above=0.5), ref)


def test_backbone_in_eval_mode_ignores_the_mode():
    bb = _subset_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    out = bb(x).cls
    bb.drop_path_mode = "sample"
    assert torch.equal(bb(x).cls, out)


def test_subset_residual_is_unbiased():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    n = 4000
    mean = sum(subset_residual(x, _branch, 0.4, generator=g) for _ in range(n)) / n
    # E = x + branch(x); std of the mean ~ |branch| * sqrt(b / k - 1) / sqrt(n) ~ 0.013 |branch|
    torch.testing.assert_close(mean, x + _branch(x), rtol=0, atol=0.07)


# --------------------------------------------------------------------------- in the backbone
def test_only_the_kept_samples_go_through_the_branches():
    bb = _subset_vit(rate=0.5)
    for blk in bb.model.blocks:
        blk.norm1, blk.mlp = Counting(blk.norm1), Counting(blk.mlp)
    bb(torch.randn(9, 3, 32, 32))  # 9 crops of 17 tokens; k = int(9 * 0.5) = 4
    for blk in bb.model.blocks:
        assert blk.norm1.rows == [4 * 17] and blk.mlp.rows == [4 * 17]
    bb.drop_path_mode = "sample"
    bb(torch.randn(9, 3, 32, 32))
    assert bb.model.blocks[0].mlp.rows[-1] == 9 * 17  # timm's DropPath: every sample


def test_packed_subset_is_per_resolution_run():
    bb = _subset_vit(rate=0.5)
    bb.packed_crops = True
    for blk in bb.model.blocks:
        blk.norm1, blk.mlp = Counting(blk.norm1), Counting(blk.mlp)
    draws = []
    orig = sd.draw_subset
    sd.draw_subset = lambda n, rate, device, generator=None: draws.append(n) or orig(n, rate, device, generator)
    try:
        glob, loc = _views()
        outs = forward_views(bb, glob + loc, breaks=(2,))
    finally:
        sd.draw_subset = orig
    assert [o.cls.shape[0] for o in outs] == [6, 9]
    # per block and branch one draw per run (6 global crops, 9 local crops), as DINOv3's _forward_list
    assert draws == [6, 9] * 4
    kept = 3 * 17 + 4 * 5  # int(6 * 0.5) crops of 17 tokens + int(9 * 0.5) crops of 5 tokens
    for blk in bb.model.blocks:
        assert blk.norm1.rows == [kept] and blk.mlp.rows == [kept]


def _loss_and_grads(bb, packed: bool):
    glob, loc = _views()
    bb.packed_crops = packed
    outs = forward_views(bb, glob + loc, breaks=(2,))
    loss = sum((o.cls ** 2).sum() + o.patches.sin().sum() for o in outs)
    params = [p for p in bb.parameters() if p.requires_grad]
    return outs, torch.autograd.grad(loss, params, allow_unused=True)


def test_packed_subset_forward_equals_unpacked_with_the_same_draws(monkeypatch):
    monkeypatch.setattr(sd, "draw_subset", _fixed_draw)
    bb = _subset_vit(rate=0.4, depth=3)
    ref, ref_g = _loss_and_grads(bb, False)
    out, out_g = _loss_and_grads(bb, True)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o.cls, r.cls, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.patches, r.patches, rtol=1e-5, atol=1e-5)
    for gr, go in zip(ref_g, out_g):
        if gr is not None:
            torch.testing.assert_close(go, gr, rtol=1e-4, atol=1e-5)
    # and the draws matter: another subset gives another output
    bb.eval()
    plain, _ = _loss_and_grads(bb, True)
    assert not torch.allclose(plain[1].cls, out[1].cls)


def test_packed_subset_residual_by_hand():
    """Two runs, (3 crops x 2 tokens) then (4 crops x 1 token): kept crops get x + n/k * branch."""
    x = torch.randn(10, 3)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    seen = []

    def branch(s, runs):
        seen.append(runs)
        return _branch(s)

    out = packed_subset_residual(x, [(3, 2), (4, 1)], branch, 0.5, generator=g1)
    assert seen == [[(1, 2), (2, 1)]]
    i_a = torch.randperm(3, generator=g2)[:1]
    i_b = torch.randperm(4, generator=g2)[:2]
    ref = x.clone()
    for c in i_a.tolist():
        ref[2 * c:2 * c + 2] += 3.0 * _branch(x[2 * c:2 * c + 2])
    for c in i_b.tolist():
        ref[6 + c] += 2.0 * _branch(x[6 + c])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("packed", [False, True])
def test_grad_checkpointing_replays_the_same_subsets(packed):
    bb = _subset_vit(rate=0.4, depth=3)
    torch.manual_seed(11)
    ref, ref_g = _loss_and_grads(bb, packed)
    bb.set_grad_checkpointing(True)
    torch.manual_seed(11)
    out, out_g = _loss_and_grads(bb, packed)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o.cls, r.cls)
    for gr, go in zip(ref_g, out_g):
        if gr is not None:
            torch.testing.assert_close(go, gr, rtol=1e-5, atol=1e-6)


def test_non_plain_blocks_keep_their_drop_path():
    from timm.models.vision_transformer import ResPostBlock

    seed_all(0)
    bb = tiny_vit(block_fn=ResPostBlock, drop_path_rate=0.5).train()
    bb.drop_path_mode = "subset"
    torch.manual_seed(2)
    out = bb(torch.randn(4, 3, 32, 32))
    bb.drop_path_mode = "sample"
    torch.manual_seed(2)
    assert torch.equal(bb(torch.randn(4, 3, 32, 32)).cls, out.cls)


# ------------------------------------------------------------------------------------- config
def _cfg(method: str, **model):
    from dinokit.config import from_dict

    backbone = {"name": "vit_tiny_patch16_224",
                "kwargs": dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=2)}
    return from_dict({"data": {"dataset": "demo"}, "crops": {"global_size": 32, "local_size": 16},
                      "model": {"method": method}, "dino": {"n_prototypes": 64},
                      "ibot": {"n_prototypes": 64} if method != "dino" else {},
                      "heads": {"hidden_dim": 32, "bottleneck_dim": 16}, "backbone": {**backbone, **model}})


def _rates(backbone):
    return [(sd.drop_rate(b.drop_path1), sd.drop_rate(b.drop_path2)) for b in backbone.model.blocks]


@pytest.mark.parametrize("method,uniform,mode,rates,expect_mode,above", [
    ("dino", None, "auto", [0.0, 0.15, 0.3], "sample", 0.0),      # DINO: linspace, DropPath (unchanged)
    ("ibot", None, "auto", [0.0, 0.15, 0.3], "sample", 0.0),      # official iBOT: as DINO
    ("dinov2", None, "auto", [0.3] * 3, "subset", 0.1),           # DINOv2: uniform, subset above 0.1
    ("dinov3", None, "auto", [0.3] * 3, "subset", 0.0),           # DINOv3: uniform, always subset
    ("dinov2", False, "sample", [0.0, 0.15, 0.3], "sample", 0.0),
    ("dino", True, "subset", [0.3] * 3, "subset", 0.0),
])
def test_config_keys_drop_path_uniform_and_mode(method, uniform, mode, rates, expect_mode, above):
    from dinokit.train.build import build_method

    m = build_method(_cfg(method, drop_path_rate=0.3, drop_path_uniform=uniform, drop_path_mode=mode))
    bb = m.student_backbone
    assert [r for pair in _rates(bb) for r in pair] == pytest.approx([r for r in rates for _ in "12"])
    assert (bb.drop_path_mode, bb.drop_path_subset_above) == (expect_mode, above)
    assert all(r == (0.0, 0.0) for r in _rates(m.teacher_backbone))  # the teacher never drops


def test_config_rejects_bad_drop_path_values():
    from dinokit.config import ConfigError

    with pytest.raises(ConfigError, match="backbone.drop_path_mode"):
        _cfg("dinov3", drop_path_mode="efficient")
    with pytest.raises(ConfigError, match="backbone.drop_path_uniform"):
        _cfg("dinov3", drop_path_uniform="sometimes")


@pytest.mark.parametrize("packed", [False, True])
def test_training_step_through_build_method_uses_the_subsets(packed):
    from dinokit.train.build import build_method

    seed_all(0)
    m = build_method(_cfg("dinov2", drop_path_rate=0.4, drop_path_mode="subset"))
    m.check_finite = False
    m.student_backbone.packed_crops = packed
    glob, loc = _views(b=4)
    masks = torch.rand(8, 16, generator=torch.Generator().manual_seed(2)) < 0.4
    draws = []
    orig = sd.draw_subset
    sd.draw_subset = lambda n, rate, device, generator=None: draws.append(n) or orig(n, rate, device, generator)
    try:
        out = m(global_views=glob, local_views=loc, masks=masks)
        out.loss.backward()
    finally:
        sd.draw_subset = orig
    # 3 blocks x 2 branches, one draw per run (8 global crops, 12 local crops)
    assert sorted(draws) == sorted([8, 12] * 6)
    grads = [p.grad for p in m.student.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert m.student_backbone.model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())
