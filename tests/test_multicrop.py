"""DINO's multi-crop augmentation and the eval transform (dinokit.data.multicrop)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import v2

from dinokit.data import EvalTransform, MultiCropConfig, MultiCropTransform


def only(**steps) -> MultiCropConfig:
    """Every random step off except those given; 8-px crops of the whole 8-px image, no
    normalisation (mean 0, std 1), so the raw pixel values can be read back."""
    base = dict(global_size=8, local_size=8, n_local=2, global_scale=(1.0, 1.0),
                local_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                blur_p=(0.0, 0.0, 0.0), solarize_p=0.0, mean=(0.0,), std=(1.0,))
    return MultiCropConfig(**{**base, **steps})


def crops(views: dict) -> list[torch.Tensor]:
    return views["global_views"] + views["local_views"]


# ----------------------------------------------------------------------------- counts and sizes
def test_default_recipe_gives_2_global_224_and_8_local_96_crops():
    v = MultiCropTransform()(Image.new("RGB", (64, 48), (200, 30, 30)))
    assert [tuple(t.shape) for t in v["global_views"]] == [(3, 224, 224)] * 2
    assert [tuple(t.shape) for t in v["local_views"]] == [(3, 96, 96)] * 8
    assert all(t.dtype == torch.float32 for t in crops(v))


@pytest.mark.parametrize(("size", "global_size", "local_size"), [(28, 28, 16), (32, 32, 16), (30, 32, 16)])
def test_small_preset_sizes(size, global_size, local_size):
    cfg = MultiCropConfig.small(size, channels=1, n_local=3)
    assert (cfg.global_size, cfg.local_size) == (global_size, local_size)
    v = MultiCropTransform(cfg)(Image.new("L", (size, size), 90))
    assert [tuple(t.shape) for t in v["global_views"]] == [(1, global_size, global_size)] * 2
    assert [tuple(t.shape) for t in v["local_views"]] == [(1, local_size, local_size)] * 3
    assert cfg.blur_kernel <= 5  # a 23-px kernel makes no sense on a 28-px image


def test_no_local_crops_and_more_global_crops():
    v = MultiCropTransform(MultiCropConfig(global_size=16, local_size=8, n_local=0))(torch.rand(3, 20, 20))
    assert v["local_views"] == [] and len(v["global_views"]) == 2
    v3 = MultiCropTransform(MultiCropConfig(global_size=16, local_size=8, n_global=3, n_local=1))(
        torch.rand(3, 20, 20))
    assert len(v3["global_views"]) == 3 and len(v3["local_views"]) == 1


# ------------------------------------------------------------------- per-crop step probabilities
def _rates(cfg: MultiCropConfig, img, applied, n: int = 400, seed: int = 0) -> torch.Tensor:
    """Fraction of ``n`` calls in which ``applied(crop)`` holds, per crop (globals then locals)."""
    torch.manual_seed(seed)
    t = MultiCropTransform(cfg)
    hits = torch.zeros(cfg.n_global + cfg.n_local)
    for _ in range(n):
        hits += torch.tensor([float(applied(c)) for c in crops(t(img))])
    return hits / n


def test_solarisation_only_on_global_crop_2_with_its_probability():
    img = torch.full((3, 8, 8), 0.9)  # solarised: 1 - 0.9 = 0.1
    rates = _rates(only(solarize_p=0.2, n_global=3), img, lambda c: c.mean() < 0.5)
    assert rates[1] == pytest.approx(0.2, abs=0.05)
    assert rates[0] == 0 and rates[2] == 0 and rates[3:].sum() == 0


def test_blur_probability_per_crop_is_1_01_05():
    img = torch.zeros(3, 8, 8)
    img[:, ::2, ::2] = 1.0  # a checkerboard: any blur lowers its peaks
    cfg = only(blur_p=(1.0, 0.1, 0.5), blur_kernel=3, blur_sigma=(1.0, 2.0), n_local=3)
    rates = _rates(cfg, img, lambda c: c.max() < 0.99)
    assert rates[0] == 1.0
    assert rates[1] == pytest.approx(0.1, abs=0.04)
    assert rates[2:].tolist() == pytest.approx([0.5] * 3, abs=0.07)


@pytest.mark.parametrize("step", ["flip", "jitter", "grayscale"])
def test_flip_jitter_and_grayscale_hit_every_crop_with_their_probability(step):
    img = torch.zeros(3, 8, 8)
    if step == "flip":  # left half red, right half black: flipped when the left column is dark
        img[0, :, :4] = 1.0
        cfg, applied = only(flip_p=0.3), lambda c: c[0, :, 0].mean() < 0.5
    elif step == "jitter":  # brightness only: a mid-grey image changes value
        img[:] = 0.5
        cfg, applied = only(jitter_p=0.6, jitter=(0.4, 0.0, 0.0, 0.0)), lambda c: (c - 0.5).abs().max() > 1e-3
    else:  # pure green turns into three equal channels
        img[1] = 1.0
        cfg, applied = only(grayscale_p=0.2), lambda c: torch.allclose(c[0], c[1], atol=1e-3)
    p = {"flip": 0.3, "jitter": 0.6, "grayscale": 0.2}[step]
    rates = _rates(cfg, img, applied, n=250)
    assert rates.tolist() == pytest.approx([p] * 4, abs=0.1)


def test_solarisation_threshold_is_128_of_255_whatever_the_input_dtype():
    cfg = only(solarize_p=1.0, n_local=0)  # global crop 2 always solarised
    t = MultiCropTransform(cfg)
    for below, above in ((torch.full((1, 8, 8), 127, dtype=torch.uint8),
                          torch.full((1, 8, 8), 128, dtype=torch.uint8)),
                         (torch.full((1, 8, 8), 0.45), torch.full((1, 8, 8), 0.55))):
        kept = t(below)["global_views"][1]
        flipped = t(above)["global_views"][1]
        expect_kept = below.float().mean() / (255 if below.dtype == torch.uint8 else 1)
        expect_flipped = 1 - above.float().mean() / (255 if above.dtype == torch.uint8 else 1)
        assert kept.mean().item() == pytest.approx(expect_kept.item(), abs=1e-4)
        assert flipped.mean().item() == pytest.approx(expect_flipped.item(), abs=1e-4)


def test_seeded_calls_repeat_and_differ_across_seeds():
    t = MultiCropTransform(MultiCropConfig(global_size=16, local_size=8, n_local=2))
    img = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a = crops(t(img))
    torch.manual_seed(1)
    b = crops(t(img))
    torch.manual_seed(2)
    c = crops(t(img))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# ------------------------------------------------------------------------- inputs and channels
def _i16(value: int) -> Image.Image:
    return Image.fromarray(np.full((8, 8), value, dtype=np.uint16))


@pytest.mark.parametrize(("img", "rgb"), [
    (Image.new("RGB", (8, 8), (255, 0, 0)), (1.0, 0.0, 0.0)),
    (Image.new("L", (8, 8), 51), (0.2, 0.2, 0.2)),
    (Image.new("RGBA", (8, 8), (0, 0, 255, 255)), (0.0, 0.0, 1.0)),   # opaque: the colour
    (Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (1.0, 1.0, 1.0)),       # transparent: white
    (Image.new("LA", (8, 8), (0, 0)), (1.0, 1.0, 1.0)),
    (Image.new("1", (8, 8), 1), (1.0, 1.0, 1.0)),
    (Image.new("RGB", (8, 8), (0, 255, 0)).convert("P"), (0.0, 1.0, 0.0)),
    (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (1.0, 1.0, 1.0)),
    (_i16(65535), (1.0, 1.0, 1.0)),                                    # 16-bit grey: full range
    (_i16(128 * 257), (128 / 255,) * 3),                               # 16-bit mid grey
    (torch.full((3, 8, 8), 255, dtype=torch.uint8), (1.0, 1.0, 1.0)),
    (torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8), (0.0, 0.0, 1.0)),
    (torch.full((1, 8, 8), 0.25), (0.25, 0.25, 0.25)),
    (torch.full((8, 8), 0.75), (0.75, 0.75, 0.75)),                    # [H, W]
    (torch.tensor([1.0, 0.0, 0.0, 0.0]).view(4, 1, 1).expand(4, 8, 8), (1.0, 1.0, 1.0)),  # alpha 0
    (torch.tensor([1.0, 0.0, 0.0, 1.0]).view(4, 1, 1).expand(4, 8, 8), (1.0, 0.0, 0.0)),  # alpha 1
])
def test_every_input_kind_gives_the_configured_channels_and_values(img, rgb):
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]  # PIL's convert("L")
    for channels, expected in ((3, rgb), (1, (luma,))):
        v = MultiCropTransform(only(channels=channels, n_local=1))(img)
        for crop in crops(v):
            assert crop.shape == (channels, 8, 8) and crop.dtype == torch.float32
            assert crop.mean(dim=(1, 2)).tolist() == pytest.approx(list(expected), abs=2 / 255)


def test_half_transparent_black_on_white_is_mid_grey():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    out = MultiCropTransform(only(n_local=0))(img)["global_views"][0]
    assert out.mean().item() == pytest.approx(127 / 255, abs=1.5 / 255)


def test_normalisation_uses_mean_and_std():
    cfg = only(mean=(0.25, 0.5, 0.0), std=(0.5, 0.25, 2.0), n_local=0)
    out = MultiCropTransform(cfg)(torch.full((3, 8, 8), 0.5))["global_views"][0]
    assert out.mean(dim=(1, 2)).tolist() == pytest.approx([0.5, 0.0, 0.25], abs=1e-5)


def test_bad_images_are_rejected_with_the_argument_named():
    t = MultiCropTransform(only())
    with pytest.raises(ValueError, match=r"img.*\[0, 1\]"):
        t(torch.full((3, 8, 8), 2.0))  # 0..255 data as float
    with pytest.raises(TypeError, match="img"):
        t(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="int64"):
        t(torch.zeros(3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"img tensor.*\(5, 8, 8\)"):
        t(torch.zeros(5, 8, 8))


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("field", "value"), [
    ("global_size", 0), ("local_size", -4), ("n_global", 0), ("n_local", -1),
    ("global_scale", (0.5, 1.5)), ("global_scale", (0.6, 0.4)), ("local_scale", (0.0, 0.4)),
    ("flip_p", 1.1), ("jitter_p", -0.1), ("grayscale_p", 2), ("solarize_p", 2.0),
    ("blur_p", (1.0, 0.1)), ("blur_p", (1.0, 0.1, 1.5)), ("blur_sigma", (2.0, 0.1)),
    ("blur_kernel", 4), ("jitter", (0.4, 0.4, 0.2, 0.9)), ("channels", 0),
    ("mean", (0.1, 0.2)), ("std", (0.2, 0.0, 0.2)), ("interpolation", "lanczos"),
    ("crop_ratio", (1.5, 0.5)),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"MultiCropConfig\.{field}\b"):
        MultiCropConfig(**{field: value})


def test_defaults_are_dinos_recipe():
    c = MultiCropConfig.imagenet()
    assert c == MultiCropConfig()
    assert (c.global_size, c.local_size, c.n_global, c.n_local) == (224, 96, 2, 8)
    assert (c.global_scale, c.local_scale) == ((0.4, 1.0), (0.05, 0.4))
    assert (c.flip_p, c.jitter, c.jitter_p, c.grayscale_p) == (0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2)
    assert (c.blur_p, c.blur_sigma, c.solarize_p, c.interpolation) == ((1.0, 0.1, 0.5), (0.1, 2.0), 0.2, "bicubic")
    assert (c.mean, c.std, c.channels) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3)


def test_dict_round_trip_is_plain_yaml():
    for cfg in (MultiCropConfig(), MultiCropConfig.small(32, channels=1, n_local=2)):
        d = cfg.to_dict()
        assert MultiCropConfig.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    with pytest.raises(ValueError, match="bogus"):
        MultiCropConfig.from_dict({"bogus": 1})


def test_per_channel_statistics_follow_channels():
    # ImageNet's three values average to the usual grey statistics (0.449, 0.226)
    grey = MultiCropConfig(channels=1)
    assert grey.mean == pytest.approx((0.449,)) and grey.std == pytest.approx((0.226,))
    assert MultiCropConfig(mean=(0.5,), std=(0.25,)).mean == (0.5, 0.5, 0.5)


# ------------------------------------------------------------------- construction and repr
def test_pipelines_are_built_once_and_the_transform_pickles(monkeypatch):
    t = MultiCropTransform(MultiCropConfig(global_size=16, local_size=8, n_local=2))

    def no_rebuild(*a, **k):
        raise AssertionError("a pipeline was rebuilt inside __call__")

    monkeypatch.setattr(v2, "Compose", no_rebuild)
    v = t(torch.rand(3, 20, 20))
    assert len(crops(v)) == 4
    again = pickle.loads(pickle.dumps(t))
    torch.manual_seed(0)
    a = crops(t(torch.full((3, 20, 20), 0.3)))
    torch.manual_seed(0)
    b = crops(again(torch.full((3, 20, 20), 0.3)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_repr_names_the_crops():
    text = repr(MultiCropTransform())
    assert "2 x 224px" in text and "8 x 96px" in text and "solarize" in text


# ----------------------------------------------------------------------------- eval transform
def test_eval_transform_for_imagenet_and_small_configs():
    big = EvalTransform.for_config(MultiCropConfig())
    assert (big.resize_size, big.crop_size) == (256, 224)
    small = EvalTransform.for_config(MultiCropConfig.small(28, channels=1))
    assert (small.resize_size, small.crop_size, small.channels) == (32, 28, 1)
    img = Image.new("RGB", (300, 200), (10, 20, 30))
    out = big(img)
    assert out.shape == (3, 224, 224) and torch.equal(out, big(img))
    assert small(Image.new("L", (28, 28), 80)).shape == (1, 28, 28)


def test_eval_transform_resizes_the_short_side_then_crops_the_centre():
    # 128 x 128 image, 16-px black border, white inside; resize 128 -> 128 keeps it, the centre
    # 96 x 96 crop removes the border; crop_fraction 1.0 keeps the border.
    img = torch.zeros(1, 128, 128)
    img[:, 16:-16, 16:-16] = 1.0
    t = EvalTransform(96, 128, mean=(0.0,), std=(1.0,), channels=1)
    assert torch.allclose(t(img), torch.ones(1, 96, 96), atol=1e-5)
    keep = EvalTransform.for_config(MultiCropConfig(global_size=128, mean=(0.0,), std=(1.0,), channels=1),
                                    crop_fraction=1.0)
    out = keep(img)
    assert out.shape == (1, 128, 128) and out[0, 0, 0].item() == pytest.approx(0.0, abs=1e-5)
    wide = EvalTransform(32, 40, mean=(0.0,), std=(1.0,), channels=1)(torch.rand(1, 50, 100))
    assert wide.shape == (1, 32, 32)
    with pytest.raises(ValueError, match="resize_size"):
        EvalTransform(224, 200)
    with pytest.raises(ValueError, match="crop_fraction"):
        EvalTransform.for_config(MultiCropConfig(), crop_fraction=1.5)
