"""Contract tests over every kind of backbone: one feature interface for all."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from conftest import tiny_vit
from dinokit.backbones import ModuleBackbone, ViTBackbone, build_backbone


class TokenNet(nn.Module):
    """Returns a token sequence [B, 1 + 4, 12] (first token = CLS)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 8, stride=8)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        return torch.cat([t.mean(1, keepdim=True), t], dim=1)


class Small32(nn.Module):
    """A CNN whose Linear only fits 32-px inputs (no 224 assumption possible)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _kinds():
    torch.manual_seed(0)
    return {
        "vit": tiny_vit(),
        "vit+registers": tiny_vit(num_registers=4),
        "timm resnet": build_backbone("resnet18"),
        "torchvision resnet": build_backbone("torchvision/resnet18"),
        "custom cnn": build_backbone(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())),
        "tokens": build_backbone(TokenNet()),
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_feature_interface(kind):
    b = _kinds()[kind]
    out = b(torch.randn(2, 3, 32, 32))
    assert out.cls.shape == (2, b.embed_dim) and torch.isfinite(out.cls).all()
    if out.patches is not None:
        assert out.patches.shape[0] == 2 and out.patches.shape[2] == b.embed_dim
    out.cls.sum().backward()
    assert any(p.grad is not None for p in b.parameters())


def test_registers_are_kept_apart_from_patches():
    plain, reg = tiny_vit(), tiny_vit(num_registers=4)
    x = torch.randn(2, 3, 32, 32)
    assert reg(x).registers.shape == (2, 4, 48) and plain(x).registers is None
    assert reg(x).patches.shape == plain(x).patches.shape == (2, 16, 48)
    assert reg.num_prefix_tokens == 5
    # registers added to a ViT module built without them
    extra = build_backbone(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                                             embed_dim=48, num_heads=2, num_classes=0,
                                             dynamic_img_size=True), num_registers=2)
    assert isinstance(extra, ViTBackbone) and extra(x).registers.shape == (2, 2, 48)


def test_vit_takes_several_sizes_and_masks():
    b = tiny_vit()
    assert b(torch.randn(1, 3, 16, 16)).patches.shape == (1, 4, 48)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        b(torch.randn(1, 3, 20, 20))
    b.enable_mask_token()
    x = torch.randn(2, 3, 32, 32)
    none = torch.zeros(2, 16, dtype=torch.bool)
    some = none.clone()
    some[:, :5] = True
    torch.testing.assert_close(b(x, masks=none).cls, b(x).cls)
    assert not torch.allclose(b(x, masks=some).cls, b(x).cls)
    with pytest.raises(ValueError, match="masks has shape"):
        b(x, masks=torch.zeros(2, 9, dtype=torch.bool))


def test_width_found_without_assuming_224():
    b = build_backbone(Small32())
    assert isinstance(b, ModuleBackbone) and b.embed_dim == 10 and b.probe_size == 32 and b.in_chans == 1


def test_bad_backbones_and_inputs_give_clear_errors():
    class DictNet(nn.Module):
        def forward(self, x):
            return {"features": x.mean((2, 3))}

    with pytest.raises(TypeError, match="returned dict"):
        build_backbone(DictNet())
    with pytest.raises(ValueError, match="4 channels .* expects 3"):
        tiny_vit()(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="unknown timm model name"):
        build_backbone("vit_does_not_exist_123")
    with pytest.raises(TypeError, match="model name, an nn.Module or a Backbone"):
        build_backbone(42)


def test_attention_of_the_last_block():
    b = tiny_vit(num_registers=2)
    a = b.last_self_attention(torch.randn(2, 3, 32, 32))
    assert a.shape == (2, 2, 1 + 2 + 16, 1 + 2 + 16)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 19))
    with pytest.raises(TypeError, match="PCA"):
        build_backbone("resnet18").last_self_attention(torch.randn(1, 3, 32, 32))
    assert b.intermediate_cls(torch.randn(2, 3, 32, 32), 2).shape == (2, 96)
