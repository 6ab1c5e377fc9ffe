"""Batched multi-crop augmentation: each batched op equals torchvision's per-sample op, the random
parameters follow the per-sample recipe's distributions (two-sample tests against torchvision's
own samplers and against :class:`MultiCropTransform`), shapes/dtypes, device independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dinokit.data import MultiCropConfig, MultiCropTransform
from dinokit.data.batched import (
    BatchedMultiCrop,
    DecodeUInt8,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    collate_uint8,
    gaussian_blur,
    sample_boxes,
    sample_params,
)

P_MIN = 1e-3  # two-sample tests: a wrong distribution gives p far below this at these sample sizes


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ each op equals torchvision's
@pytest.mark.parametrize(("ours", "theirs", "lo", "hi"), [
    (adjust_brightness, F.adjust_brightness, 0.6, 1.4),
    (adjust_contrast, F.adjust_contrast, 0.6, 1.4),
    (adjust_saturation, F.adjust_saturation, 0.0, 1.8),
    (adjust_hue, F.adjust_hue, -0.5, 0.5),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_colour_ops_equal_torchvision_per_sample(ours, theirs, lo, hi, channels):
    g = _gen(1)
    x = torch.rand(6, channels, 9, 7, generator=g)
    x[0] = 0.5  # grey pixels: no hue
    x[1, :, :3] = x[1, :1, :3]  # equal channels in part of an image
    f = lo + (hi - lo) * torch.rand(6, generator=g)
    ref = torch.stack([theirs(x[i], float(f[i])) for i in range(6)])
    torch.testing.assert_close(ours(x.clone(), f), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize(("size", "kernel"), [(20, 23), (96, 23), (8, 3)])
def test_gaussian_blur_equals_torchvision_per_sample(size, kernel):
    g = _gen(2)
    x = torch.rand(4, 3, size, size, generator=g)
    sigma = 0.1 + 1.9 * torch.rand(4, generator=g)
    k = min(kernel, 2 * size - 1)
    ref = torch.stack([F.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(4)])
    torch.testing.assert_close(gaussian_blur(x, sigma, k), ref, atol=2e-6, rtol=0)


# ------------------------------------------------------- parameters follow torchvision's samplers
@pytest.mark.parametrize(("hw", "scale"), [((375, 500), (0.4, 1.0)), ((375, 500), (0.05, 0.4)),
                                           ((30, 300), (0.4, 1.0))])  # a strip: fallback crops
def test_crop_boxes_follow_random_resized_crop(hw, scale):
    n = 3000
    torch.manual_seed(0)
    img = torch.zeros(1, *hw)
    ref = np.array([v2.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])
    ours = sample_boxes(torch.tensor([hw] * n), scale, (3 / 4, 4 / 3), _gen(3)).numpy()
    assert (ours[:, 2] >= 1).all() and (ours[:, 0] + ours[:, 2] <= hw[0]).all()
    assert (ours[:, 3] >= 1).all() and (ours[:, 1] + ours[:, 3] <= hw[1]).all()
    for col in range(4):  # top, left, height, width
        assert stats.ks_2samp(ours[:, col], ref[:, col]).pvalue > P_MIN, col
    if hw[0] * 4 < hw[1]:
        assert (ours[:, 2:] == [30, 40]).all()  # always the fallback: the centre 30 x 40 (ratio 4/3)
        return
    wrong = sample_boxes(torch.tensor([hw] * n), (scale[0], (scale[0] + scale[1]) / 2), (3 / 4, 4 / 3),
                         _gen(4)).numpy()
    assert stats.ks_2samp(wrong[:, 2] * wrong[:, 3], ref[:, 2] * ref[:, 3]).pvalue < P_MIN  # the test bites


def test_jitter_factors_and_operation_order_follow_colour_jitter():
    n = 3000
    cfg = MultiCropConfig()
    jitter = v2.ColorJitter(*cfg.jitter)
    torch.manual_seed(0)
    ref = [jitter.make_params([torch.zeros(3, 2, 2)]) for _ in range(n)]
    ref_f = np.array([[r["brightness_factor"], r["contrast_factor"], r["saturation_factor"], r["hue_factor"]]
                      for r in ref])
    p = sample_params(cfg, torch.tensor([[8, 8]] * n), cfg.global_scale, torch.zeros(n), torch.zeros(n),
                      _gen(5))
    on = p.jitter.numpy()
    assert on.mean() == pytest.approx(cfg.jitter_p, abs=0.03)
    ours = p.factors.numpy()[on]
    for col in range(4):
        assert stats.ks_2samp(ours[:, col], ref_f[:, col]).pvalue > P_MIN, col
    # every operation is equally likely at every position, as with torch.randperm(4)
    ref_first = np.bincount([int(r["fn_idx"][0]) for r in ref], minlength=4)
    ours_first = np.bincount(p.order[:, 0].numpy(), minlength=4)
    assert stats.chi2_contingency(np.stack([ref_first, ours_first])).pvalue > P_MIN
    assert len({tuple(o) for o in p.order.tolist()}) == 24
    off = p.factors.numpy()[~on]
    assert (off == [1, 1, 1, 0]).all()


# ------------------------------------------------------------- whole recipe vs the per-sample one
def _rates(views: dict, applied) -> np.ndarray:
    crops = views["global_views"] + views["local_views"]
    return np.array([[float(applied(c)) for c in view] for view in crops]).mean(1)


def _only(**changes) -> MultiCropConfig:
    """One step on at a time: 8 px crops of the whole image, everything else off."""
    base = dict(global_size=8, local_size=8, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), n_local=2,
                flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0,
                mean=(0.0,), std=(1.0,))
    return MultiCropConfig(**{**base, **changes})


@pytest.mark.parametrize(("changes", "image", "applied", "expected"), [
    (dict(solarize_p=0.2), "bright", lambda c: c.mean() < 0.5, [0, 0.2, 0, 0]),
    (dict(blur_p=(1.0, 0.1, 0.5), blur_kernel=3, blur_sigma=(1.0, 2.0)), "checker",
     lambda c: c.max() < 0.99, [1.0, 0.1, 0.5, 0.5]),
    (dict(flip_p=0.3), "half", lambda c: c[0, :, 0].mean() < 0.5, [0.3] * 4),
    (dict(grayscale_p=0.2), "green", lambda c: torch.allclose(c[0], c[1], atol=1e-3), [0.2] * 4),
    (dict(jitter_p=0.6, jitter=(0.4, 0.0, 0.0, 0.0)), "mid", lambda c: (c - 128 / 255).abs().max() > 1e-3,
     [0.6] * 4),
])
def test_each_step_hits_each_crop_with_the_recipe_probability(changes, image, applied, expected):
    img = torch.zeros(3, 8, 8)
    if image == "bright":
        img[:] = 0.9
    elif image == "checker":
        img[:, ::2, ::2] = 1.0
    elif image == "half":
        img[0, :, :4] = 1.0
    elif image == "green":
        img[1] = 1.0
    else:
        img[:] = 0.5
    u8 = (img * 255).round().to(torch.uint8)
    n = 400
    views = BatchedMultiCrop(_only(**changes))(u8.expand(n, -1, -1, -1), _gen(6))
    rates = _rates(views, applied)
    tol = 3.5 * np.sqrt(np.array(expected) * (1 - np.array(expected)) / n) + 1e-9
    assert np.all(np.abs(rates - expected) <= tol), (rates, expected)
    torch.manual_seed(6)  # the per-sample transform agrees
    per_sample = MultiCropTransform(_only(**changes))
    ref = np.mean([_rates({k: [v[None] for v in vs] for k, vs in per_sample(u8).items()}, applied)
                   for _ in range(150)], axis=0)
    assert np.all(np.abs(ref - expected) <= 3.5 * np.sqrt(np.array(expected) * (1 - np.array(expected)) / 150)
                  + 1e-9)


def test_crop_statistics_match_the_per_sample_transform():
    """Mean and spread of every crop of a textured image: the batched path and MultiCropTransform
    (same resize on CPU) give the same distributions."""
    g = _gen(7)
    img = (torch.rand(3, 40, 50, generator=g) * 255).round().to(torch.uint8)
    img[0, :20] = 250  # some structure, so crops differ in colour and brightness
    cfg = MultiCropConfig(global_size=24, local_size=12, n_local=2, blur_kernel=5)
    n = 600
    views = BatchedMultiCrop(cfg)(img.expand(n, -1, -1, -1), _gen(8))
    torch.manual_seed(8)
    t = MultiCropTransform(cfg)
    ref = [t(img) for _ in range(n)]
    for key in ("global_views", "local_views"):
        for v in range(len(views[key])):
            ours = views[key][v]
            theirs = torch.stack([r[key][v] for r in ref])
            for reduce in (lambda c: c.mean((1, 2, 3)), lambda c: c.std((1, 2, 3)), lambda c: c[:, 1].mean((1, 2))):
                assert stats.ks_2samp(reduce(ours).numpy(), reduce(theirs).numpy()).pvalue > P_MIN, (key, v)


# ------------------------------------------------------------------------- shapes, dtypes, devices
def test_shapes_dtypes_and_channels():
    cfg = MultiCropConfig(global_size=32, local_size=16, n_local=3)
    imgs = [torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8),
            torch.randint(0, 256, (1, 60, 30), dtype=torch.uint8),  # grey: repeated to RGB
            torch.randint(0, 256, (45, 45), dtype=torch.uint8)]
    out = BatchedMultiCrop(cfg)(imgs, _gen(9))
    assert [tuple(v.shape) for v in out["global_views"]] == [(3, 3, 32, 32)] * 2
    assert [tuple(v.shape) for v in out["local_views"]] == [(3, 3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out["global_views"])
    grey = BatchedMultiCrop(MultiCropConfig.small(28, channels=1, n_local=0))(
        torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8), _gen(9))
    assert tuple(grey["global_views"][0].shape) == (5, 1, 28, 28) and grey["local_views"] == []
    with pytest.raises(ValueError, match="uint8"):
        BatchedMultiCrop(cfg)(torch.rand(2, 3, 8, 8))


def test_identity_recipe_returns_the_normalised_image():
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    cfg = _only(global_size=16, local_size=16, mean=(0.5,), std=(0.25,))
    for resize in ("resize", "roi_align"):
        out = BatchedMultiCrop(cfg, resize=resize)(img, _gen(0))
        for v in out["global_views"] + out["local_views"]:
            torch.testing.assert_close(v, (img.float() / 255 - 0.5) / 0.25, atol=1e-5, rtol=0)


def test_seeded_calls_repeat_and_padding_does_not_leak():
    cfg = MultiCropConfig(global_size=16, local_size=8, n_local=2)
    small = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    big = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    t = BatchedMultiCrop(cfg)
    a, b, c = t([small, big], _gen(1)), t([small, big], _gen(1)), t([small, big], _gen(2))
    assert all(torch.equal(x, y) for x, y in zip(a["global_views"], b["global_views"]))
    assert not torch.equal(a["global_views"][0], c["global_views"][0])
    batch = collate_uint8([(small, 3), (big, None)])  # edge-padded to 40 x 30
    assert tuple(batch["images"].shape) == (2, 3, 40, 30) and batch["labels"].tolist() == [3, -1]
    assert batch["sizes"].tolist() == [[20, 24], [40, 30]]
    for resize in ("resize", "roi_align"):
        t = BatchedMultiCrop(cfg, resize=resize)
        padded = t(batch["images"], _gen(1), sizes=batch["sizes"])
        listed = t([small, big], _gen(1))
        for x, y in zip(padded["global_views"] + padded["local_views"], listed["global_views"] + listed["local_views"]):
            torch.testing.assert_close(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_same_seed_gives_the_same_crops_on_cpu_and_gpu():
    cfg = MultiCropConfig(global_size=32, local_size=16, n_local=2)
    img = torch.randint(0, 256, (4, 3, 48, 40), dtype=torch.uint8)
    cpu = BatchedMultiCrop(cfg, resize="roi_align")(img, _gen(3))
    gpu = BatchedMultiCrop(cfg, device="cuda", resize="roi_align")(img, _gen(3))
    for x, y in zip(cpu["global_views"] + cpu["local_views"], gpu["global_views"] + gpu["local_views"]):
        assert y.device.type == "cuda"
        torch.testing.assert_close(x, y.cpu(), atol=1e-4, rtol=0)


def test_decode_gives_uint8_with_the_configured_channels():
    rgb = Image.fromarray(np.full((30, 60, 3), (255, 0, 0), dtype=np.uint8))
    t = DecodeUInt8(channels=1)(rgb)
    assert t.dtype == torch.uint8 and tuple(t.shape) == (1, 30, 60) and int(t[0, 0, 0]) == 76  # PIL luma
    small = DecodeUInt8(channels=3, max_short_side=15)(rgb)
    assert tuple(small.shape) == (3, 15, 30)
    assert tuple(DecodeUInt8(channels=3)(torch.rand(1, 5, 6)).shape) == (3, 5, 6)
