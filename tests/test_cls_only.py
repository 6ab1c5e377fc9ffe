"""CLS-only forward of timm ViTs (DINO reads ``out.cls`` only): the last block runs for the CLS rows
only. It must equal the full forward (CLS output and every gradient), keep stochastic depth's
draws, fall back to the full forward where hooks or other methods need it, and really skip work."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dinokit
from conftest import full_last_block, seed_all, tiny_cnn, tiny_vit
from dinokit.backbones.vit import ViTBackbone
from dinokit.methods import composed
from dinokit.methods.base import forward_views

HEAD = dict(projector_hidden_dim=32, projector_bottleneck_dim=16, n_prototypes=64)
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 (the DINO step)
TOL64 = dict(rtol=1e-10, atol=1e-10)  # float64 (the backbone alone): rounding only, no slack for a bug


def _views(b: int = 3, n_global: int = 2, n_local: int = 3, gen: int = 0):
    g = torch.Generator().manual_seed(gen)
    return ([torch.randn(b, 3, 32, 32, generator=g) for _ in range(n_global)],
            [torch.randn(b, 3, 16, 16, generator=g) for _ in range(n_local)])


def _backbone(registers: int = 0, extra: int = 0, **kw) -> ViTBackbone:
    seed_all(0)
    bb = tiny_vit(num_registers=registers, **kw)
    if extra:  # registers added on top of the model's own ones
        bb = ViTBackbone(bb.model, extra_registers=extra)
    return bb.double()


def _cls_and_grads(bb: ViTBackbone, views, cls_only: bool, packed: bool, seed: int = 0):
    bb.packed_crops = packed
    torch.manual_seed(seed)  # the same stochastic-depth draws for both forwards
    outs = forward_views(bb, [v.double() for v in views], breaks=(2,), cls_only=cls_only)
    cls = torch.cat([o.cls for o in outs])
    loss = (cls.sin() * torch.linspace(-1, 1, cls.shape[-1], dtype=cls.dtype)).sum()
    params = [p for p in bb.parameters() if p.requires_grad]
    return outs, cls, torch.autograd.grad(loss, params, allow_unused=True)


def _assert_same(a, b):
    cls_a, grads_a = a
    cls_b, grads_b = b
    torch.testing.assert_close(cls_a, cls_b, **TOL64)
    for ga, gb in zip(grads_a, grads_b):
        if ga is None or gb is None:
            assert ga is None and gb is None
        else:
            torch.testing.assert_close(ga, gb, **TOL64)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("registers,extra", [(0, 0), (2, 0), (1, 2)])
def test_cls_only_forward_equals_full_forward(packed, registers, extra):
    bb = _backbone(registers, extra)
    glob, loc = _views()
    full_outs, *full = _cls_and_grads(bb, glob + loc, False, packed)
    outs, *pruned = _cls_and_grads(bb, glob + loc, True, packed)
    _assert_same(pruned, full)
    assert all(o.patches is None and o.registers is None for o in outs)
    assert full_outs[0].patches is not None  # the full forward is unchanged
    # the key/value rows of the patches and registers reach the CLS: their parameters get gradient
    if extra:
        assert pruned[1][[n for n, _ in bb.named_parameters()].index("register_tokens")].abs().sum() > 0


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode,rate,ckpt", [("sample", 0.0, True), ("sample", 0.4, False),
                                            ("subset", 0.5, False), ("subset", 0.5, True)])
def test_stochastic_depth_and_checkpointing_keep_the_same_draws(packed, mode, rate, ckpt):
    """In training, with the same random state, the CLS-only last block drops the same samples
    (crops) as the full block: outputs and gradients are equal, not only equal in law."""
    bb = _backbone(1, drop_path_rate=rate)
    bb.drop_path_mode = mode
    bb.set_grad_checkpointing(ckpt)
    bb.train()
    glob, loc = _views(b=4)
    _, *full = _cls_and_grads(bb, glob + loc, False, packed, seed=3)
    outs, *pruned = _cls_and_grads(bb, glob + loc, True, packed, seed=3)
    assert outs[0].patches is None
    _assert_same(pruned, full)
    if rate:  # the draws matter: another seed gives another result
        _, *other = _cls_and_grads(bb, glob + loc, True, packed, seed=4)
        assert not torch.allclose(other[0], pruned[0])


def _dino(packed: bool = True, **vit):
    seed_all(0)
    return dinokit.DINO(tiny_vit(**vit), **HEAD)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("drop_path,mode,ckpt", [(0.0, "sample", False), (0.3, "sample", False),
                                                 (0.3, "subset", True)])
def test_dino_step_loss_and_gradients_equal_with_and_without_the_trick(packed, drop_path, mode, ckpt):
    on = _dino(drop_path_rate=drop_path)
    on.student_backbone.drop_path_mode = mode
    on.student_backbone.set_grad_checkpointing(ckpt)
    with torch.no_grad():  # make the teacher differ from the student
        for p in on.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    on.train()
    on.student_backbone.packed_crops = packed
    off = copy.deepcopy(on)
    full_last_block(off.student_backbone, off.teacher_backbone)
    glob, loc = _views()
    results = []
    for model in (on, off):
        torch.manual_seed(7)
        out = model(global_views=glob, local_views=loc)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.student.named_parameters()}))
    (out_on, g_on), (out_off, g_off) = results
    torch.testing.assert_close(out_on.loss, out_off.loss, **TOL)
    torch.testing.assert_close(out_on.embedding, out_off.embedding, **TOL)
    assert g_on.keys() == g_off.keys()
    for name in g_on:
        if g_on[name] is None:
            assert g_off[name] is None, name
        else:
            torch.testing.assert_close(g_on[name], g_off[name], **TOL, msg=name)
    assert g_on["backbone.model.blocks.1.mlp.fc1.weight"].abs().sum() > 0


def _record_cls_only(monkeypatch) -> list[bool]:
    seen: list[bool] = []
    orig = composed.forward_views

    def spy(*args, **kw):
        seen.append(kw.get("cls_only", False))
        return orig(*args, **kw)

    monkeypatch.setattr(composed, "forward_views", spy)
    return seen


def test_dino_asks_for_cls_only_and_dinov2_does_not(monkeypatch):
    seen = _record_cls_only(monkeypatch)
    glob, loc = _views()
    _dino()(global_views=glob, local_views=loc)
    assert seen == [True, True]  # teacher, student
    seen.clear()
    seed_all(0)
    v2 = dinokit.DINOv2(tiny_vit(), **HEAD, n_patch_prototypes=64)
    out = v2(global_views=glob, local_views=loc)
    assert seen == [False, False] and torch.isfinite(out.loss)
    assert "loss_patch" in out.losses


def test_full_forward_when_the_backbone_cannot_or_may_not_prune():
    glob, _ = _views()
    x = glob[0].double()
    bb = _backbone()
    # a hook on the last block: it sees every token, and the output is the full one
    seen = []
    h = bb.model.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = bb(x, cls_only=True)
    h.remove()
    assert seen == [(3, 17, 48)] and out.patches is not None
    for module in (bb.model.blocks, bb.model.norm, bb):
        h = module.register_forward_hook(lambda m, i, o: None)
        assert bb(x, cls_only=True).patches is not None
        h.remove()
    assert bb(x, cls_only=True).patches is None  # hooks gone: pruned again
    # no class token: the CLS output is the patch mean, which needs every row
    seed_all(0)
    mean_bb = tiny_vit(class_token=False, global_pool="avg").double()
    assert not mean_bb.has_cls_token
    torch.testing.assert_close(mean_bb(x, cls_only=True).cls, mean_bb(x).cls)


def test_other_backbones_run_unchanged():
    glob, loc = _views()
    seed_all(0)
    cnn = dinokit.DINO(tiny_cnn(), **HEAD)
    assert not getattr(cnn.student_backbone, "supports_cls_only", False)
    assert torch.isfinite(cnn(global_views=glob, local_views=loc).loss)
    out = forward_views(cnn.student_backbone, glob, cls_only=True)
    assert out[0].patches is not None


def test_the_saved_work_is_real():
    """The last block's MLP sees one row per crop instead of every token, and the step's FLOPs drop
    by what the module docstring says: proj + MLP + CLS-free query of the non-CLS rows."""
    bb = _backbone(registers=2)
    glob, _ = _views()
    x = torch.cat(glob).double()  # 6 crops of 1 + 2 + 16 tokens
    mlp = bb.model.blocks[-1].mlp
    rows: list[int] = []
    orig = mlp.forward
    mlp.forward = lambda t: rows.append(t.shape[:-1].numel()) or orig(t)  # no hook: not a fallback
    try:
        bb(x, cls_only=True).cls.sum().backward()
        bb(x).cls.sum().backward()
    finally:
        del mlp.forward
    assert rows == [6, 6 * 19]
    flops = []
    for cls_only in (True, False):
        with FlopCounterMode(display=False) as fc:
            bb(x, cls_only=cls_only).cls.sum().backward()
        flops.append(fc.get_total_flops())
    d, rows_saved = 48, 6 * 18
    # forward matmuls per skipped row: q (D^2) + proj (D^2) + MLP (8 D^2) multiply-adds; backward 2x
    expected = 3 * 2 * rows_saved * 10 * d * d
    saved = flops[1] - flops[0]
    assert 0.9 * expected < saved < 1.2 * expected, (flops, expected)


def test_embed_and_cls_feature_extraction_ask_for_the_cls_token_only():
    """``method.embed`` (k-NN, export) and ``extract_features(kind="cls")`` skip the dead rows too,
    with the same features as the full forward."""
    from dinokit.eval.features import extract_features

    torch.manual_seed(0)
    method = dinokit.DINO(tiny_vit(), **HEAD).eval()
    seen: list[int] = []
    mlp = method.teacher_backbone.model.blocks[-1].mlp
    plain = mlp.forward
    mlp.forward = lambda x: (seen.append(x.shape[0] * (x.shape[1] if x.ndim == 3 else 1)), plain(x))[1]
    x = torch.randn(3, 3, 32, 32)
    fast = method.embed(x)
    feats, _ = extract_features(method, [x], progress=False)
    assert seen == [3, 3]  # one CLS row per image through the last MLP, not every token
    full_last_block(method.teacher_backbone)
    torch.testing.assert_close(method.embed(x), fast, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats, fast, rtol=1e-5, atol=1e-6)
