"""Sequence-packed multi-crop and activation checkpointing of timm ViTs: both must equal the plain
per-resolution forward (outputs and gradients), on DINO-style and DINOv2-style (masked, registers)
inputs."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock

import dinokit
from conftest import seed_all, tiny_vit
from dinokit.backbones.vit import ViTBackbone
from dinokit.methods.base import forward_views, packs_crops, resolution_groups


def _views(b: int = 3, n_global: int = 2, n_local: int = 3, gen: int = 0):
    g = torch.Generator().manual_seed(gen)
    glob = [torch.randn(b, 3, 32, 32, generator=g) for _ in range(n_global)]
    loc = [torch.randn(b, 3, 16, 16, generator=g) for _ in range(n_local)]
    return glob, loc


def _backbone(registers: int = 0, extra: int = 0, **kw) -> ViTBackbone:
    seed_all(0)
    bb = tiny_vit(num_registers=registers, **kw)
    if extra:  # registers added on top of the timm model's own ones (no position embedding)
        bb = ViTBackbone(bb.model, extra_registers=extra)
    bb.enable_mask_token()
    return bb


def _outputs(bb: ViTBackbone, packed: bool, views, masks):
    bb.packed_crops = packed
    outs = forward_views(bb, views, masks, breaks=(2,))
    loss = sum((o.cls ** 2).sum() + (o.patches.sin()).sum()
               + (0 if o.registers is None else o.registers.sum()) for o in outs)
    grads = torch.autograd.grad(loss, [p for p in bb.parameters() if p.requires_grad], allow_unused=True)
    return outs, grads


@pytest.mark.parametrize("masked,registers,extra", [(False, 0, 0), (True, 2, 0), (True, 1, 2)])
def test_packed_forward_equals_per_resolution_outputs_and_gradients(masked, registers, extra):
    bb = _backbone(registers, extra)
    bb.train()
    glob, loc = _views()
    masks = (torch.rand(6, 16, generator=torch.Generator().manual_seed(1)) < 0.4) if masked else None
    calls = []
    orig = ViTBackbone.forward_packed
    ViTBackbone.forward_packed = lambda self, inputs: calls.append(len(inputs)) or orig(self, inputs)
    try:
        ref, ref_g = _outputs(bb, False, glob + loc, masks)
        out, out_g = _outputs(bb, True, glob + loc, masks)
    finally:
        ViTBackbone.forward_packed = orig
    assert calls == [2]  # one packed pass over the 32-px and the 16-px run; none unpacked
    assert len(ref) == len(out) == 2 and out[0].cls.shape == (6, 48) and out[1].cls.shape == (9, 48)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o.cls, r.cls, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.patches, r.patches, rtol=1e-5, atol=1e-5)
        if registers + extra:
            assert o.registers.shape[1] == registers + extra
            torch.testing.assert_close(o.registers, r.registers, rtol=1e-5, atol=1e-5)
    for gr, go in zip(ref_g, out_g):
        if gr is None:
            assert go is None
        else:
            torch.testing.assert_close(go, gr, rtol=1e-4, atol=1e-5)
    if masked:  # the mask token was used by the global run only (and it changes the output)
        assert out_g[[n for n, _ in bb.named_parameters()].index("mask_token")].abs().sum() > 0


def test_packed_attention_stays_within_each_crop():
    """Changing one crop's pixels changes that crop's outputs only."""
    bb = _backbone(2)
    bb.packed_crops = True
    glob, loc = _views()
    out = forward_views(bb, glob + loc)
    loc2 = [loc[0].clone(), loc[1], loc[2]]
    loc2[0][1] += 1.0  # local view 0, image 1: row 3 * 0 + 1 of the local run
    out2 = forward_views(bb, glob + loc2)
    torch.testing.assert_close(out2[0].cls, out[0].cls)
    changed = (out2[1].cls - out[1].cls).abs().amax(dim=1) > 1e-6
    assert changed.tolist() == [i == 1 for i in range(9)]


def test_packed_stochastic_depth_is_per_crop():
    """Drop probability 1 drops every residual branch of every crop, packed as unpacked: the
    output is the normalised input tokens."""
    from timm.layers import DropPath

    bb = _backbone(0, drop_path_rate=0.5)
    for blk in bb.model.blocks:
        blk.drop_path1, blk.drop_path2 = DropPath(1.0), DropPath(1.0)
    bb.train()
    glob, loc = _views()
    ref = [bb(torch.cat(glob)), bb(torch.cat(loc))]
    bb.packed_crops = True
    out = forward_views(bb, glob + loc, breaks=(2,))
    for r, o in zip(ref, out):
        torch.testing.assert_close(o.cls, r.cls)
    torch.testing.assert_close(out[1].cls, bb.model.norm(bb.tokens(torch.cat(loc)))[:, 0])


def test_packing_switch_and_auto_mode():
    bb = _backbone()
    glob, loc = _views()
    assert resolution_groups(glob + loc, breaks=(2,)) == [(0, 2), (2, 5)]
    assert resolution_groups(glob + glob, breaks=(2,)) == [(0, 2), (2, 4)]
    assert bb.packed_crops == "auto" and packs_crops(bb, glob + loc, 2)  # auto: on (measured faster)
    bb.packed_crops = True
    assert packs_crops(bb, glob + loc, 2) and not packs_crops(bb, glob, 1)
    assert not packs_crops(tiny_vit(block_fn=ResPostBlock), glob + loc, 2)
    bb.packed_crops = False
    assert not packs_crops(bb, glob + loc, 2)


def test_hooks_are_never_bypassed():
    """Forward hooks on the backbone or inside a block keep the per-resolution passes they see."""
    bb = _backbone()
    bb.packed_crops = True
    glob, loc = _views()
    seen = []
    h = bb.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    assert not packs_crops(bb, glob + loc, 2)
    forward_views(bb, glob + loc, breaks=(2,))
    assert seen == [(6, 3, 32, 32), (9, 3, 16, 16)]
    h.remove()
    assert packs_crops(bb, glob + loc, 2)
    h = bb.model.blocks[1].mlp.register_forward_pre_hook(lambda mod, args: None)
    assert not bb.can_pack and not packs_crops(bb, glob + loc, 2)
    h.remove()
    assert bb.can_pack


@pytest.mark.parametrize("cls", ["DINO", "DINOv2"])
def test_method_loss_and_gradients_equal_with_packed_crops(cls):
    def run(packed: bool):
        seed_all(0)
        kw = dict(projector_hidden_dim=32, projector_bottleneck_dim=16, n_prototypes=64,
                  encoder_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2))
        if cls == "DINOv2":
            kw.update(n_patch_prototypes=64, n_register_tokens=2)
        m = getattr(dinokit, cls)("vit_tiny_patch16_224", **kw)
        m.student_backbone.packed_crops = packed
        m.check_finite = False
        glob, loc = _views()
        extra = {}
        if cls == "DINOv2":
            extra["masks"] = torch.rand(6, 16, generator=torch.Generator().manual_seed(2)) < 0.4
        out = m(global_views=glob, local_views=loc, **extra)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in m.student.named_parameters() if p.grad is not None}

    loss_ref, g_ref = run(False)
    loss, g = run(True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("packed", [False, True])
def test_grad_checkpointing_gives_the_same_gradients(packed):
    glob, loc = _views()
    masks = torch.rand(6, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    bb = _backbone(2)
    bb.train()
    ref, ref_g = _outputs(bb, packed, glob + loc, masks)
    calls = []
    import dinokit.backbones.vit as vit_mod

    orig = vit_mod.checkpoint
    vit_mod.checkpoint = lambda *a, **k: calls.append(k.get("use_reentrant")) or orig(*a, **k)
    try:
        bb.set_grad_checkpointing(True)
        assert bb.grad_checkpointing
        out, out_g = _outputs(bb, packed, glob + loc, masks)
        with torch.no_grad():  # no recomputation without gradients
            forward_views(bb, glob + loc, masks, breaks=(2,))
    finally:
        vit_mod.checkpoint = orig
    n_blocks = len(bb.model.blocks)
    assert calls == [False] * (n_blocks if packed else 2 * n_blocks)  # every block, non-reentrant
    for r, o in zip(ref, out):
        torch.testing.assert_close(o.cls, r.cls)
    for gr, go in zip(ref_g, out_g):
        if gr is not None:
            torch.testing.assert_close(go, gr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value,expected", [("auto", "auto"), (True, True), ("false", False)])
def test_config_key_model_packed_crops(value, expected):
    from dinokit.config import ConfigError, from_dict
    from dinokit.train.build import build_method

    backbone = {"name": "vit_tiny_patch16_224",
                "kwargs": dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=2)}
    base = {"data": {"dataset": "demo"}, "crops": {"global_size": 32, "local_size": 16},
            "dino": {"n_prototypes": 64}, "heads": {"hidden_dim": 32, "bottleneck_dim": 16}}
    cfg = from_dict({**base, "backbone": {**backbone, "packed_crops": value}})
    assert build_method(cfg).student_backbone.packed_crops == expected
    with pytest.raises(ConfigError, match="backbone.packed_crops"):
        from_dict({**base, "backbone": {**backbone, "packed_crops": "yes"}})
