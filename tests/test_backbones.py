"""Contract tests of the one feature interface every backbone speaks: ``cls [B, D]`` (D ==
``embed_dim``), ``patches [B, N, D]`` where the model has them, ``registers [B, R, D]`` kept apart
(Darcet et al., ICLR 2024), any input size a ViT's patch size divides (DINO's 224 + 96 multi-crop),
the last block's attention (DINO's attention maps) and iBOT's mask token."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from conftest import TINY_VIT, seed_all, tiny_cnn, tiny_vit
from dinokit.backbones import ModuleBackbone, ViTBackbone, build_backbone


class TokenNet(nn.Module):
    """Returns tokens ``[B, 1 + 16, 12]`` at 32 px: a mean token then 4x4 patch tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 8, stride=8)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        return torch.cat([t.mean(1, keepdim=True), t], dim=1)


class Only32(nn.Module):
    """A 1-channel CNN whose Linear only fits 32-px inputs: the width must be found at 32 px."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _timm_vit_module():
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **TINY_VIT)


# kind -> (factory, embed_dim D, patch tokens N at 32 px or None)
KINDS = {
    "timm vit": (tiny_vit, 48, 16),
    "timm vit + 4 registers": (lambda: tiny_vit(num_registers=4), 48, 16),
    "timm vit module": (lambda: build_backbone(_timm_vit_module()), 48, 16),
    "timm resnet18": (lambda: build_backbone("resnet18"), 512, 1),  # 32 px -> 1x1 map
    "torchvision resnet18": (lambda: build_backbone("torchvision/resnet18"), 512, None),  # pooled
    "custom cnn": (lambda: build_backbone(tiny_cnn()), 8, 16 * 16),
    "token module": (lambda: build_backbone(TokenNet()), 12, 16),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_feature_contract(kind):
    factory, dim, n_patches = KINDS[kind]
    seed_all(0)
    backbone = factory()
    out = backbone(torch.randn(2, 3, 32, 32))
    assert backbone.embed_dim == dim
    assert out.cls.shape == (2, dim) and torch.isfinite(out.cls).all()
    if n_patches is None:
        assert out.patches is None and not backbone.has_patch_tokens
    else:
        assert out.patches.shape == (2, n_patches, dim) and backbone.has_patch_tokens
    out.cls.sum().backward()  # the features are differentiable w.r.t. the weights
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())


def test_feature_map_is_average_pooled_and_its_cells_become_patches():
    """A module returning ``[B, D, H, W]``: cls = global average pool, patches = the H*W cells."""
    seed_all(0)
    cnn = tiny_cnn()
    backbone = build_backbone(cnn)
    x = torch.randn(2, 3, 32, 32)
    fmap = cnn(x)  # [2, 8, 16, 16]
    out = backbone(x)
    torch.testing.assert_close(out.cls, fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(out.patches[:, 5], fmap[:, :, 0, 5])  # row-major cells
    torch.testing.assert_close(out.patches[:, 16 + 3], fmap[:, :, 1, 3])


def test_token_sequence_first_token_is_cls():
    """A module returning ``[B, T, D]``: the first token is the CLS, the rest the patches."""
    seed_all(0)
    net = TokenNet()
    x = torch.randn(2, 3, 32, 32)
    tokens = net(x)
    out = build_backbone(net)(x)
    torch.testing.assert_close(out.cls, tokens[:, 0])
    torch.testing.assert_close(out.patches, tokens[:, 1:])


def test_vit_features_match_timm():
    """CLS and patches are timm's own ``forward_features`` tokens ``[CLS, patches...]``."""
    seed_all(0)
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = vit.model.forward_features(x)  # [B, 1 + 16, D] after the final norm
    out = vit(x)
    torch.testing.assert_close(out.cls, ref[:, 0])
    torch.testing.assert_close(out.patches, ref[:, 1:])
    assert out.registers is None


def test_registers_are_kept_apart_from_cls_and_patches():
    """timm's token order is [CLS, 4 registers, 16 patches]: registers [B, 4, D] on their own,
    the 16 patches unchanged in number compared with the same ViT without registers."""
    seed_all(0)
    plain, reg = tiny_vit(), tiny_vit(num_registers=4)
    x = torch.randn(2, 3, 32, 32)
    ref = reg.model.forward_features(x)
    assert ref.shape == (2, 1 + 4 + 16, 48)
    out = reg(x)
    assert reg.num_registers == 4 and reg.num_prefix_tokens == 5
    torch.testing.assert_close(out.cls, ref[:, 0])
    torch.testing.assert_close(out.registers, ref[:, 1:5])
    torch.testing.assert_close(out.patches, ref[:, 5:])
    assert out.patches.shape == plain(x).patches.shape == (2, 16, 48)


def test_registers_added_to_a_vit_module_built_without_them():
    seed_all(0)
    backbone = build_backbone(_timm_vit_module(), num_registers=2)
    assert isinstance(backbone, ViTBackbone) and backbone.num_registers == 2
    out = backbone(torch.randn(2, 3, 32, 32))
    assert out.registers.shape == (2, 2, 48) and out.patches.shape == (2, 16, 48)


@pytest.mark.parametrize(("size", "n_patches"), [(16, 4), (48, 36)])
def test_one_vit_takes_several_input_sizes(size, n_patches):
    """DINO's multi-crop feeds one ViT with global and local crops: a ViT built for 32 px reads
    16- and 48-px images (position embeddings interpolated), as timm's dynamic-size forward."""
    seed_all(0)
    vit = tiny_vit()
    x = torch.randn(2, 3, size, size)
    out = vit(x)
    assert out.patches.shape == (2, n_patches, 48)
    torch.testing.assert_close(out.cls, vit.model.forward_features(x)[:, 0])


def test_vit_refuses_sizes_the_patch_size_does_not_divide():
    with pytest.raises(ValueError, match="20x20 is not a multiple of the patch size 8"):
        tiny_vit()(torch.randn(1, 3, 20, 20))


def test_width_is_found_for_a_model_built_for_32_px():
    """No 224-px assumption: 224, 128, 96 and 64 px fail on this model, 32 px works."""
    backbone = build_backbone(Only32())
    assert isinstance(backbone, ModuleBackbone)
    assert (backbone.embed_dim, backbone.probe_size, backbone.in_chans) == (10, 32, 1)
    assert backbone(torch.randn(3, 1, 32, 32)).cls.shape == (3, 10)


class ReturnsDict(nn.Module):
    def forward(self, x):
        return {"features": x.mean((2, 3))}


class ReturnsTuple(nn.Module):
    def forward(self, x):
        return (x.mean((2, 3)),)


@pytest.mark.parametrize(("module", "name"), [(ReturnsDict(), "dict"), (ReturnsTuple(), "tuple")])
def test_modules_returning_containers_are_refused(module, name):
    with pytest.raises(TypeError, match=f"returned {name}; it must return a tensor"):
        build_backbone(module)


@pytest.mark.parametrize("kind", ["timm vit", "custom cnn"])
def test_wrong_channel_count_names_the_channels(kind):
    backbone = KINDS[kind][0]()
    with pytest.raises(ValueError, match=r"4 channels \(shape \(1, 4, 32, 32\)\) but the backbone expects 3"):
        backbone(torch.randn(1, 4, 32, 32))


def _last_block_input(vit, x):
    """The token sequence entering the last block, captured with a hook during a normal forward."""
    seen = []
    handle = vit.model.blocks[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    vit(x)
    handle.remove()
    return seen[0]


def test_last_self_attention_is_the_softmax_of_the_last_block():
    """``[B, heads, T, T]`` (T = CLS + registers + patches), rows sum to 1, and it is the real
    attention: ``proj(A @ V)`` reproduces the last block's attention output."""
    seed_all(0)
    vit = tiny_vit(num_registers=2)
    last = vit.model.blocks[-1]
    with torch.no_grad():
        last.attn.qkv.weight.mul_(20)  # at init (std 0.02) attention is nearly uniform: sharpen it
    x = torch.randn(2, 3, 32, 32)
    attn = vit.last_self_attention(x)
    assert attn.shape == (2, 2, 1 + 2 + 16, 1 + 2 + 16)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 19))

    h = last.norm1(_last_block_input(vit, x))
    v = last.attn.qkv(h).reshape(2, 19, 3, 2, 24)[:, :, 2].transpose(1, 2)  # [B, heads, T, 24]
    mixed = (attn @ v).transpose(1, 2).reshape(2, 19, 48)
    torch.testing.assert_close(last.attn.proj(mixed), last.attn(h), atol=1e-5, rtol=1e-4)
    # the check above can fail: uniform attention (same shape, rows sum to 1) does not pass it
    flat = torch.full_like(attn, 1 / 19)
    wrong = last.attn.proj((flat @ v).transpose(1, 2).reshape(2, 19, 48))
    assert not torch.allclose(wrong, last.attn(h), atol=1e-3)


def test_cnn_has_no_attention_and_points_to_pca():
    with pytest.raises(TypeError, match="PCA"):
        build_backbone(tiny_cnn()).last_self_attention(torch.randn(1, 3, 32, 32))


def test_mask_token_replaces_the_patch_embedding():
    """iBOT/DINOv2: a masked patch's embedding is replaced by the mask token *before* the position
    embedding. Two images differ only in patch 0; with the mask token set to image y's patch-0
    embedding, x with patch 0 masked gives exactly y's features."""
    seed_all(0)
    vit = tiny_vit()
    vit.enable_mask_token()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., :8, :8] = torch.randn(1, 3, 8, 8)  # patch 0 is the top-left 8x8 block
    with torch.no_grad():
        vit.mask_token.copy_(vit.model.patch_embed(y).reshape(1, -1, 48)[:, :1])
    mask0 = torch.zeros(1, 16, dtype=torch.bool)
    mask0[0, 0] = True

    torch.testing.assert_close(vit(x, masks=mask0).patches, vit(y).patches)
    assert not torch.allclose(vit(x).patches, vit(y).patches, atol=1e-3)  # patch 0 does matter


def test_masks_change_the_output_and_an_empty_mask_changes_nothing():
    seed_all(0)
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    plain = vit(x).cls
    vit.enable_mask_token()
    none = torch.zeros(2, 16, dtype=torch.bool)
    some = none.clone()
    some[:, :5] = True
    torch.testing.assert_close(vit(x, masks=none).cls, plain)  # the token alone changes nothing
    assert not torch.allclose(vit(x, masks=some).cls, plain, atol=1e-3)
    with pytest.raises(ValueError, match=r"masks has shape \(2, 9\) but the images give \(2, 16\)"):
        vit(x, masks=torch.zeros(2, 9, dtype=torch.bool))


def test_cnn_cannot_mask():
    with pytest.raises(TypeError, match="cannot mask patches"):
        build_backbone(tiny_cnn())(torch.randn(1, 3, 32, 32), masks=torch.zeros(1, 256, dtype=torch.bool))


def test_unknown_names_and_objects_are_refused():
    with pytest.raises(ValueError, match="unknown timm model name 'vit_does_not_exist_123'"):
        build_backbone("vit_does_not_exist_123")
    with pytest.raises(ValueError, match="unknown torchvision model 'nope'"):
        build_backbone("torchvision/nope")
    with pytest.raises(TypeError, match="model name, an nn.Module or a Backbone, got int"):
        build_backbone(42)
