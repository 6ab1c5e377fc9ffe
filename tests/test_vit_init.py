"""``backbone.init``: ``timm`` leaves timm's (the official DINOv2) initialisation bit-identical;
``xavier`` (MAE's and lightly's scheme) gives each weight the xavier-uniform law of its widths,
written here from its formula; it is refused where it cannot apply."""

from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch
from torch import nn

from dinokit.methods.registry import build_method, make_backbone, method_spec
from dinokit.settings import BackboneSettings

#: Wide enough for tight statistics, small enough for seconds: 8-px patches of 3 channels (fan-in
#: 192), width 192, MLP 768, two registers.
VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=192, num_heads=3)
NAME = "vit_tiny_patch16_224"


def _settings(**kw) -> BackboneSettings:
    return dataclasses.replace(BackboneSettings(name=NAME, kwargs=dict(VIT), n_registers=2), **kw)


def _backbone(init: str, seed: int = 0):
    torch.manual_seed(seed)
    return make_backbone(method_spec("dinov2"), _settings(init=init))


def _timm_reference(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(NAME, num_classes=0, dynamic_img_size=True, reg_tokens=2, **VIT)


def _xavier_bound(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape[0], w[0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_default_leaves_timms_initialisation_bit_identical():
    assert BackboneSettings().init == "timm"
    got, ref = _backbone("timm").model.state_dict(), _timm_reference().state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_xavier_follows_its_formula():
    model, ref = _backbone("xavier").model, _timm_reference()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 8  # qkv, proj, fc1, fc2 per block
    for w in [m.weight for m in linears] + [model.patch_embed.proj.weight]:
        bound = _xavier_bound(w)
        flat = w.detach().flatten()
        # uniform on [-bound, bound]: every value inside, the extremes reached, std bound / sqrt(3)
        assert flat.abs().max() <= bound
        assert flat.abs().max() >= 0.99 * bound
        assert flat.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
        assert flat.mean().abs() < 0.01 * bound
    for m in linears:
        assert torch.count_nonzero(m.bias) == 0
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.2)  # 192 draws of N(0, 0.02)
    # kept as built: the patch-embedding bias, the position embedding, the registers
    for k in ("patch_embed.proj.bias", "pos_embed", "reg_token"):
        assert torch.equal(model.state_dict()[k], ref.state_dict()[k]), k
    # and far from timm's trunc-normal(0.02) where the widths are small
    assert model.blocks[0].attn.proj.weight.std() > 3 * ref.blocks[0].attn.proj.weight.std()


def test_xavier_reaches_the_teacher():
    from conftest import settings

    torch.manual_seed(0)
    s = settings(backbone={"name": NAME, "kwargs": dict(VIT), "init": "xavier"},
                 heads={"hidden_dim": 32, "bottleneck_dim": 16}, dino={"n_prototypes": 32},
                 ibot={"n_prototypes": 32})
    m = build_method("dinov2", s)
    w = m.student_backbone.model.blocks[1].mlp.fc2.weight
    assert w.abs().max() >= 0.99 * _xavier_bound(w)
    for (k, p), (_, q) in zip(m.student_backbone.state_dict().items(),
                              m.teacher_backbone.state_dict().items(), strict=True):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("name,kwargs", [
    ("vit_small_patch16_dinov3", dict(depth=1, embed_dim=32, num_heads=2)),  # timm Eva
    ("resnet10t", {}),
])
def test_xavier_is_refused_where_it_cannot_apply(name, kwargs):
    b = BackboneSettings(name=name, kwargs=kwargs, init="xavier")
    with pytest.raises(ValueError, match=r"^backbone.init: 'xavier' applies to timm ViTs .* not " + name):
        make_backbone(method_spec("dino"), b)


def test_xavier_with_published_weights_is_refused_before_any_download(monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("built")

    monkeypatch.setattr("dinokit.methods.registry.build_backbone", no_download)
    with pytest.raises(ValueError, match=r"^backbone.init: 'xavier' would overwrite the published weights"):
        make_backbone(method_spec("dino"), _settings(init="xavier", pretrained=True))


def test_config_key_and_one_line_errors():
    from dinokit.config import ConfigError, from_dict
    from dinokit.train.build import build_method as build_from_config

    base = {"data": {"dataset": "demo"}, "crops": {"global_size": 32, "local_size": 16},
            "dino": {"n_prototypes": 64}, "heads": {"hidden_dim": 32, "bottleneck_dim": 16}}
    vit = {"name": NAME, "kwargs": dict(VIT, embed_dim=48, num_heads=2, depth=1)}
    torch.manual_seed(0)
    w = build_from_config(from_dict({**base, "backbone": {**vit, "init": "xavier"}})).student_backbone.model
    assert w.blocks[0].attn.qkv.weight.abs().max() >= 0.99 * _xavier_bound(w.blocks[0].attn.qkv.weight)
    with pytest.raises(ConfigError, match="backbone.init"):
        from_dict({**base, "backbone": {**vit, "init": "kaiming"}})
    cnn = {"name": "resnet10t", "init": "xavier"}
    with pytest.raises(ConfigError, match="^backbone.init: 'xavier' applies to timm ViTs"):
        build_from_config(from_dict({**base, "backbone": cnn}))


def test_the_tiny_cpu_vit_presets_use_xavier_and_the_others_keep_the_official_init():
    from dinokit.config import load_config

    for preset in ("demo", "dinov2_tiny_cpu", "dinov3_tiny_cpu"):
        assert load_config(preset).backbone.init == "xavier", preset
    for preset in ("demo_cnn", "dinov2_vit_small", "dinov3_vit_small", "vit_small_imagenet",
                   "continue_dinov2", "continue_dinov3"):
        assert load_config(preset).backbone.init == "timm", preset
