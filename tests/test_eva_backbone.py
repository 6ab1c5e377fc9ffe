"""timm's DINOv3 ViTs (``Eva``: rotary position embeddings, 4 storage tokens) and ConvNeXt as dinokit
backbones: token split, iBOT mask token where the official ``prepare_tokens_with_masks`` puts it,
last-block attention with RoPE, dynamic sizes, activation checkpointing, every method trains on
them; families dinokit cannot drive are refused with the list of supported ones."""

from __future__ import annotations

import pytest
import torch

import dinokit
from conftest import settings
from dinokit.backbones import EvaBackbone, ModuleBackbone, ViTBackbone, build_backbone

TINY_V3 = dict(depth=2, embed_dim=32, num_heads=2)


def tiny_dinov3(name: str = "vit_small_patch16_dinov3") -> EvaBackbone:
    torch.manual_seed(0)
    return build_backbone(name, encoder_kwargs=TINY_V3)


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb"])
@pytest.mark.parametrize("hw", [(32, 32), (48, 16)])
def test_tokens_are_split_as_timm_orders_them(name, hw):
    bb = tiny_dinov3(name).eval()
    assert isinstance(bb, EvaBackbone) and bb.num_registers == 4 and bb.patch_size == 16
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out, ref = bb(x), bb.model.forward_features(x)  # [CLS, 4 storage, patches]
    n = (hw[0] // 16) * (hw[1] // 16)
    assert out.cls.shape == (2, 32) and out.registers.shape == (2, 4, 32) and out.patches.shape == (2, n, 32)
    torch.testing.assert_close(out.cls, ref[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out.registers, ref[:, 1:5], rtol=0, atol=0)
    torch.testing.assert_close(out.patches, ref[:, 5:], rtol=0, atol=0)
    assert bb.grid_size(*hw) == (hw[0] // 16, hw[1] // 16)


def test_mask_token_enters_before_the_blocks_with_no_position_added():
    # Official DINOv3: x = where(masks, mask_token, patch_embed(x)); then [cls, storage, x]; RoPE only
    # acts inside attention, so the first block must see the mask token itself at masked places.
    bb = tiny_dinov3()
    bb.enable_mask_token()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.tensor([[False, True, False, True], [False, False, False, False]])
    seen = []
    h = bb.model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    masked = bb(x, masks=masks)
    h.remove()
    tokens = seen[0]
    for j in (1, 3):
        torch.testing.assert_close(tokens[0, 5 + j], bb.mask_token[0, 0])
    assert not torch.allclose(tokens[0, 5], bb.mask_token[0, 0])
    plain = bb(x)
    torch.testing.assert_close(masked.cls[1], plain.cls[1])  # unmasked row unchanged
    assert not torch.allclose(masked.cls[0], plain.cls[0])
    with pytest.raises(ValueError, match=r"masks has shape \(2, 5\)"):
        bb(x, masks=torch.zeros(2, 5, dtype=torch.bool))


def _rot(x, rope):
    # timm's "cat" RoPE with rotate-half: x * cos + rotate_half(x) * sin; rope = [sin, cos]
    sin, cos = rope.tensor_split(2, -1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_last_self_attention_applies_rope_to_patches_only():
    bb = tiny_dinov3().eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        att = bb.last_self_attention(x)
        t, rope = bb.tokens_and_rope(x)
        t = bb.model.blocks[0](t, rope=rope)
        blk = bb.model.blocks[1]
        h = blk.norm1(t)
        B, T, D = h.shape
        qkv = blk.attn.qkv(h).reshape(B, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        q = torch.cat([q[:, :, :5], _rot(q[:, :, 5:], rope)], dim=2)
        k = torch.cat([k[:, :, :5], _rot(k[:, :, 5:], rope)], dim=2)
        ref = ((q * (D // 2) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    assert att.shape == (1, 2, 5 + 6, 5 + 6)
    torch.testing.assert_close(att, ref, rtol=1e-4, atol=1e-5)
    assert bb.intermediate_cls(x, 2).shape == (1, 64)


@pytest.mark.parametrize("make", [tiny_dinov3, lambda: build_backbone(
    "vit_tiny_patch16_224", encoder_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2))])
def test_activation_checkpointing_is_honoured(make, monkeypatch):
    import dinokit.backbones.eva as eva_mod
    import dinokit.backbones.vit as vit_mod

    bb = make()
    x = torch.randn(2, 3, 32, 32)
    bb(x).cls.sum().backward()
    ref = [p.grad.clone() for p in bb.parameters()]
    bb.zero_grad()
    calls = []
    for mod in (eva_mod, vit_mod):
        real = mod.checkpoint
        monkeypatch.setattr(mod, "checkpoint", lambda f, *a, _r=real, **k: calls.append(1) or _r(f, *a, **k))
    bb.set_grad_checkpointing(True)
    assert bb.grad_checkpointing
    bb(x).cls.sum().backward()
    assert len(calls) == 2  # one per block
    for p, g in zip(bb.parameters(), ref):
        torch.testing.assert_close(p.grad, g)
    with torch.no_grad():
        bb(x)
    assert len(calls) == 2  # no recomputation without grad


@pytest.mark.parametrize("cls", [dinokit.DINO, dinokit.DINOv2, dinokit.DINOv3])
def test_every_method_trains_a_dinov3_vit(cls):
    torch.manual_seed(0)
    extra = {} if cls is dinokit.DINO else dict(n_patch_prototypes=16)
    gram = {"weight": 1.0} if cls is dinokit.DINOv3 else {}
    extra["n_cls_prototypes" if cls is dinokit.DINOv3 else "n_prototypes"] = 16
    m = cls("vit_small_patch16_dinov3", projector_hidden_dim=16, projector_bottleneck_dim=8,
            settings=settings(backbone={"kwargs": TINY_V3}, gram=gram), **extra)
    assert isinstance(m.student_backbone, EvaBackbone)
    g = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    loc = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    out = m(global_views=g, local_views=loc)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert m.student_backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    if cls is not dinokit.DINO:
        assert m.student_backbone.mask_token.grad is not None


def test_convnext_is_a_cnn_backbone_that_keeps_its_kwargs():
    bb = build_backbone("convnext_atto", encoder_kwargs=dict(in_chans=1))
    assert isinstance(bb, ModuleBackbone) and bb.embed_dim == 320 and bb.in_chans == 1
    assert bb.timm_kwargs == {"in_chans": 1}
    out = bb(torch.randn(2, 1, 64, 96))
    assert out.patches.shape == (2, 2 * 3, 320) and bb.grid_size(64, 96) == (2, 3)


def test_unsupported_families_list_what_is_supported():
    with pytest.raises(ValueError, match=r"SwinTransformer.*cannot drive.*supported: timm ViTs.*DINOv3.*convnext"):
        build_backbone("swin_tiny_patch4_window7_224", encoder_kwargs=dict(depths=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match="num_registers=2 does not match"):
        build_backbone(tiny_dinov3().model, num_registers=2)
    assert build_backbone("vit_small_patch16_dinov3", num_registers=2, encoder_kwargs=TINY_V3).num_registers == 2


def test_dinov2_hub_names_are_vits():
    bb = build_backbone("vit_small_patch14_reg4_dinov2", encoder_kwargs=dict(img_size=56, **TINY_V3))
    assert type(bb) is ViTBackbone and bb.num_registers == 4 and bb.patch_size == 14
    out = bb(torch.randn(1, 3, 28, 42))
    assert out.patches.shape == (1, 6, 32) and out.registers.shape == (1, 4, 32)
