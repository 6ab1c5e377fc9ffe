"""DINO's multi-crop augmentation (Caron et al. ICCV 2021, Sec. 3.1 and Appendix; the colour recipe
is BYOL's, Grill et al. 2020, Table 6), built on ``torchvision.transforms.v2``.

Each image gives ``n_global`` crops of ``global_size`` px (RandomResizedCrop over ``global_scale``
of the area) and ``n_local`` crops of ``local_size`` px (``local_scale``). Every crop is flipped,
colour-jittered and turned grey at random; Gaussian blur is applied with probability 1.0 / 0.1 /
0.5 to global crop 1 / global crop 2 / the local crops, solarisation to global crop 2 only; then
normalisation. Images become float ``[C, H, W]`` in [0, 1] first, so every step (and the
solarisation threshold) works in that range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Fashion-MNIST's pixel mean and std (train split), the small preset's normalisation.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
#: PIL's solarisation threshold 128 (of 255, as DINO applies it) in the float range of the pipeline.
SOLARIZE_THRESHOLD = 128 / 255
#: ITU-R 601-2 luma, what PIL's ``convert("L")`` uses.
LUMA = (0.299, 0.587, 0.114)
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")


# ---------------------------------------------------------------------------------------- input
def to_l_or_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> mode ``L`` or ``RGB``: alpha composited on white, palettes expanded,
    16-bit grey scaled to 8 bit, other colour spaces converted to RGB; L and RGB are kept as is."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("LA", "La") or mode in ("RGBA", "RGBa", "PA") or "transparency" in img.info:
        grey = mode in ("LA", "La")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(white, rgba).convert("RGB")
        return out.convert("L") if grey else out
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def to_image_tensor(img: Any, channels: int) -> Tensor:
    """PIL image (any mode) or tensor -> float32 ``[channels, H, W]`` in [0, 1].

    Tensors: ``[H, W]`` or ``[C, H, W]`` with C in 1 (grey), 2 (grey + alpha), 3 (RGB) or
    4 (RGBA); uint8 (0..255) or float/bool in [0, 1]. Alpha is composited on white; grey is repeated
    to RGB for ``channels=3``, RGB is reduced to luma for ``channels=1``. For any other ``channels``
    (multi-band data, :mod:`~dinokit.data.multiband`) the tensor must be float ``[channels, H, W]``
    and is kept as it is, in whatever range its bands have.
    """
    if isinstance(img, Image.Image) and channels not in (1, 3):
        raise TypeError(f"a PIL image has 1 or 3 channels, not channels={channels}: read multi-band files "
                        "with dinokit.data.multiband")
    if isinstance(img, Image.Image):
        t = F.pil_to_tensor(to_l_or_rgb(img)).float().div_(255.0)
    elif isinstance(img, Tensor) and channels not in (1, 3):
        t = img.unsqueeze(0) if img.ndim == 2 else img
        if t.ndim != 3 or t.shape[0] != channels:
            raise ValueError(f"img tensor must be [{channels}, H, W] for channels={channels} (multi-band "
                             f"data), got shape {tuple(img.shape)}")
        return t.float().contiguous()
    elif isinstance(img, Tensor):
        t = img.unsqueeze(0) if img.ndim == 2 else img
        if t.ndim != 3 or t.shape[0] not in (1, 2, 3, 4):
            raise ValueError(f"img tensor must be [H, W] or [C, H, W] with C in 1..4, "
                             f"got shape {tuple(img.shape)}")
        if t.dtype == torch.uint8:
            t = t.float().div_(255.0)
        elif t.dtype == torch.bool or t.is_floating_point():
            t = t.float()
            lo, hi = float(t.min()), float(t.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(
                    f"img float tensor must hold values in [0, 1], got min {lo:.4g}, max {hi:.4g}"
                    " (pass uint8 for 0..255 data; normalisation happens in the transform)"
                )
            t = t.clamp(0.0, 1.0)
        else:
            raise TypeError(f"img tensor must be uint8, bool or float, got {t.dtype}")
        if t.shape[0] in (2, 4):  # composite the colour (or grey) channels on white
            alpha = t[-1:]
            t = t[:-1] * alpha + (1.0 - alpha)
    else:
        raise TypeError(f"img must be a PIL image or a torch tensor, got {type(img).__name__}")
    if t.shape[0] == 1 and channels == 3:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 3 and channels == 1:
        t = (LUMA[0] * t[0] + LUMA[1] * t[1] + LUMA[2] * t[2]).unsqueeze(0)
    return t.contiguous()


# --------------------------------------------------------------------------------------- config
def _field_error(name: str, rule: str, value: Any, owner: str = "MultiCropConfig.") -> ValueError:
    return ValueError(f"{owner}{name} must be {rule}, got {value!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _numbers(name: str, value: Any, n: int) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise _field_error(name, f"{n} numbers", value) from None
    if len(out) != n:
        raise _field_error(name, f"{n} numbers", value)
    return out


def _probability(name: str, p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise _field_error(name, "a probability in [0, 1]", p)
    return float(p)


def per_channel(name: str, value: Any, channels: int, owner: str = "MultiCropConfig.") -> tuple[float, ...]:
    """One value per channel: 1 value is repeated, 3 values are averaged for one channel."""
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise _field_error(name, "a sequence of numbers", value, owner) from None
    if len(vals) == channels:
        return vals
    if len(vals) == 1:
        return vals * channels
    if len(vals) == 3 and channels == 1:
        return (sum(vals) / 3.0,)
    raise _field_error(name, f"1 or {channels} values for channels={channels}", value, owner)


@dataclass
class MultiCropConfig:
    """Every size, scale and probability of the multi-crop recipe; defaults are DINO on ImageNet.

    ``blur_p`` holds the blur probabilities of (global crop 1, global crop 2, local crops); global
    crops past the second use global 2's blur and no solarisation. ``mean``/``std`` may hold one
    value (used for every channel) or three (averaged when ``channels=1``), so switching
    ``channels`` on a config keeps it valid. ``channels``: 3 = RGB output (grey repeated), 1 = grey,
    any other count = multi-band images (float ``[channels, H, W]`` tensors, see
    :mod:`~dinokit.data.multiband`): crops, flips and blur act on every band, brightness/contrast
    jitter on each band alone (:class:`BandJitter`), nothing is clamped, and the RGB-only operations
    (saturation/hue jitter, greyscale, solarisation) are refused, naming them (:meth:`for_bands`
    switches them off).
    """

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 23
    solarize_p: float = 0.2
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3

    def __post_init__(self) -> None:
        for name, least in (("global_size", 1), ("local_size", 1), ("n_global", 1), ("n_local", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < least:
                raise _field_error(name, f"an int >= {least}", value)
            setattr(self, name, int(value))
        for name in ("global_scale", "local_scale"):
            lo, hi = _numbers(name, getattr(self, name), 2)
            if not 0.0 < lo <= hi <= 1.0:
                raise _field_error(name, "ordered (low <= high) within (0, 1]", getattr(self, name))
            setattr(self, name, (lo, hi))
        lo, hi = self.crop_ratio = _numbers("crop_ratio", self.crop_ratio, 2)  # type: ignore[assignment]
        if not 0.0 < lo <= hi:
            raise _field_error("crop_ratio", "ordered positive aspect ratios", self.crop_ratio)
        if self.interpolation not in INTERPOLATIONS:
            raise _field_error("interpolation", f"one of {list(INTERPOLATIONS)}",
                               self.interpolation)
        for name in ("flip_p", "jitter_p", "grayscale_p", "solarize_p"):
            setattr(self, name, _probability(name, getattr(self, name)))
        self.blur_p = tuple(_probability("blur_p", p)  # type: ignore[assignment]
                            for p in _numbers("blur_p", self.blur_p, 3))
        self.jitter = _numbers("jitter", self.jitter, 4)  # type: ignore[assignment]
        if min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise _field_error("jitter", "(brightness, contrast, saturation, hue) >= 0, hue <= 0.5",
                               self.jitter)
        lo, hi = self.blur_sigma = _numbers("blur_sigma", self.blur_sigma, 2)  # type: ignore[assignment]
        if not 0.0 < lo <= hi:
            raise _field_error("blur_sigma", "ordered positive numbers", self.blur_sigma)
        if not _is_int(self.blur_kernel) or self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise _field_error("blur_kernel", "an odd int >= 1", self.blur_kernel)
        if not _is_int(self.channels) or self.channels < 1:
            raise _field_error("channels", "an int >= 1 (1 = grey, 3 = RGB, other = multi-band)",
                               self.channels)
        if self.channels not in (1, 3):
            rgb_only = rgb_only_augmentations(self)
            if rgb_only:
                raise ValueError(
                    f"MultiCropConfig: {', '.join(rgb_only)} assume RGB images and cannot be used with "
                    f"channels={self.channels}; set them to 0 (MultiCropConfig.for_bands does; brightness "
                    "and contrast jitter are applied per band)")
        self.blur_kernel, self.channels = int(self.blur_kernel), int(self.channels)
        self.mean = per_channel("mean", self.mean, self.channels)
        self.std = per_channel("std", self.std, self.channels)
        if min(self.std) <= 0:
            raise _field_error("std", "positive", self.std)

    @classmethod
    def for_bands(cls, channels: int, base: MultiCropConfig | None = None, **changes: Any) -> MultiCropConfig:
        """``base`` (default: the ImageNet recipe) for ``channels``-band images: the operations that
        assume RGB (saturation and hue jitter, greyscale, solarisation) set to 0; brightness and
        contrast jitter stay and act on each band independently (:class:`BandJitter`). ``mean``/``std``
        default to 0 and 1 (no normalisation): give the bands' own (``dinokit data stats``)."""
        base = base or cls()
        b, c, _, _ = base.jitter
        fields = {**dataclasses.asdict(base), "channels": channels, "jitter": (b, c, 0.0, 0.0),
                  "grayscale_p": 0.0, "solarize_p": 0.0, "mean": (0.0,), "std": (1.0,), **changes}
        return cls(**fields)

    @classmethod
    def imagenet(cls, **changes: Any) -> MultiCropConfig:
        """DINO's ImageNet recipe: 2 x 224 px global crops, 8 x 96 px local crops (the defaults)."""
        return cls(**changes)

    @classmethod
    def small(cls, image_size: int = 28, **changes: Any) -> MultiCropConfig:
        """For tiny sources (28-32 px, e.g. Fashion-MNIST, CIFAR).

        Global crops at the source size rounded to a multiple of 4 (patch sizes 4 or 2 divide it),
        local crops at about half of that (also a multiple of 4) over ``(0.1, 0.4)`` of the area
        (0.05 of 28 x 28 px would be a 6 px scrap). The blur kernel is 3 px with sigma in
        (0.1, 1.0) (BYOL's 23 px is 10 % of 224 px), but blur and solarisation are off by default,
        as in solo-learn's CIFAR recipes and in the setting dinokit's demo was tuned with; set
        ``blur_p``/``solarize_p`` to turn them on. Fashion-MNIST's mean/std. ``changes`` override
        any field.
        """
        if not _is_int(image_size) or image_size < 4:
            raise ValueError(f"image_size must be an int >= 4, got {image_size!r}")
        global_size = max(4, int(image_size / 4 + 0.5) * 4)
        fields: dict[str, Any] = dict(
            global_size=global_size,
            local_size=max(4, int(global_size / 8 + 0.5) * 4),
            global_scale=(0.4, 1.0),
            local_scale=(0.1, 0.4),
            blur_p=(0.0, 0.0, 0.0),
            blur_kernel=3,
            blur_sigma=(0.1, 1.0),
            solarize_p=0.0,
            mean=(FASHION_MNIST_MEAN,),
            std=(FASHION_MNIST_STD,),
        )
        fields.update(changes)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, floats, strings and lists only (YAML-safe)."""
        items = dataclasses.asdict(self).items()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in items}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultiCropConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"MultiCropConfig.from_dict needs a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown MultiCropConfig fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def rgb_only_augmentations(cfg: MultiCropConfig) -> list[str]:
    """The fields of ``cfg`` that switch on an operation defined only for RGB images (named as
    fields: ``jitter saturation``, ``jitter hue``, ``grayscale_p``, ``solarize_p``)."""
    names = []
    if cfg.jitter_p > 0 and cfg.jitter[2] > 0:
        names.append("jitter saturation")
    if cfg.jitter_p > 0 and cfg.jitter[3] > 0:
        names.append("jitter hue")
    if cfg.grayscale_p > 0:
        names.append("grayscale_p")
    if cfg.solarize_p > 0:
        names.append("solarize_p")
    return names


# ------------------------------------------------------------------------------------ pipelines
class BandJitter(torch.nn.Module):
    """Brightness and contrast jitter of every band on its own, for multi-band images (where colour
    jitter has no meaning): band ``c`` becomes ``m_c + k_c (b_c x_c - m_c)`` with ``b_c`` drawn from
    ``[1 - brightness, 1 + brightness]``, ``k_c`` from ``[1 - contrast, 1 + contrast]`` and ``m_c``
    the band's mean after the brightness change (torchvision's contrast blends with the grey mean
    instead). No clamping: bands keep their own range."""

    def __init__(self, brightness: float, contrast: float):
        super().__init__()
        self.brightness, self.contrast = float(brightness), float(contrast)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[-3]
        shape = (c, 1, 1)
        if self.brightness > 0:
            x = x * torch.empty(shape).uniform_(1 - self.brightness, 1 + self.brightness).to(x)
        if self.contrast > 0:
            mean = x.mean(dim=(-2, -1), keepdim=True)
            k = torch.empty(shape).uniform_(1 - self.contrast, 1 + self.contrast).to(x)
            x = mean + k * (x - mean)
        return x


class _Clamp01(torch.nn.Module):
    """Clamp to [0, 1]: bicubic resizing overshoots, colour ops and solarisation expect [0, 1]."""

    def forward(self, t: Tensor) -> Tensor:
        return t.clamp(0.0, 1.0)


def _crop_pipeline(cfg: MultiCropConfig, size: int, scale: tuple[float, float], blur_p: float,
                   solarize_p: float) -> v2.Compose:
    """One crop's steps on a float ``[C, H, W]`` image in [0, 1]; steps with p = 0 left out."""
    bands = cfg.channels not in (1, 3)  # multi-band: no [0, 1] range, no colour operations
    steps: list[Any] = [
        v2.RandomResizedCrop(size, scale=scale, ratio=cfg.crop_ratio,
                             interpolation=InterpolationMode(cfg.interpolation), antialias=True),
        *([] if bands else [_Clamp01()]),
    ]
    if cfg.flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.flip_p))
    brightness, contrast, saturation, hue = cfg.jitter
    if bands:
        if cfg.jitter_p > 0 and (brightness or contrast):
            steps.append(v2.RandomApply([BandJitter(brightness, contrast)], p=cfg.jitter_p))
        saturation = hue = brightness = contrast = 0.0
    if cfg.channels == 1:  # saturation and hue do not exist in grey
        saturation, hue = 0.0, 0.0
    if cfg.jitter_p > 0 and any((brightness, contrast, saturation, hue)):
        steps.append(v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)],
                                    p=cfg.jitter_p))
    if cfg.channels == 3 and cfg.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(cfg.grayscale_p))
    if blur_p > 0:
        kernel = min(cfg.blur_kernel, 2 * size - 1)  # reflect padding needs kernel // 2 < size
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=cfg.blur_sigma)], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p))
    steps.append(v2.Normalize(list(cfg.mean), list(cfg.std)))
    return v2.Compose(steps)


class MultiCropTransform:
    """Image -> ``{"global_views": [Tensor C x G x G] * n_global, "local_views": [Tensor C x L x L]
    * n_local}`` (float32, normalised; ``local_views`` is ``[]`` when ``n_local=0``).

    Accepts PIL images of any mode and tensors (see :func:`to_image_tensor`). The per-crop
    pipelines are built once here; a call only samples. Randomness comes from torch's global
    generator (seed it, or let a loader seed each sample).
    """

    def __init__(self, config: MultiCropConfig | dict[str, Any] | None = None):
        if isinstance(config, dict):
            config = MultiCropConfig.from_dict(config)
        if config is not None and not isinstance(config, MultiCropConfig):
            raise TypeError(f"config must be a MultiCropConfig, a dict or None, got "
                            f"{type(config).__name__}")
        self.config = cfg = config or MultiCropConfig()
        blur = [cfg.blur_p[0]] + [cfg.blur_p[1]] * (cfg.n_global - 1)
        solarize = [0.0 if i != 1 else cfg.solarize_p for i in range(cfg.n_global)]  # crop 2 only
        self.global_pipelines = [
            _crop_pipeline(cfg, cfg.global_size, cfg.global_scale, blur[i], solarize[i])
            for i in range(cfg.n_global)
        ]
        self.local_pipeline = _crop_pipeline(cfg, cfg.local_size, cfg.local_scale, cfg.blur_p[2],
                                             0.0)

    def __call__(self, img: Any) -> dict[str, list[Tensor]]:
        x = to_image_tensor(img, self.config.channels)
        return {
            "global_views": [pipe(x) for pipe in self.global_pipelines],
            "local_views": [self.local_pipeline(x) for _ in range(self.config.n_local)],
        }

    def __repr__(self) -> str:
        c = self.config
        solarize = [0.0, c.solarize_p][: c.n_global]
        return (
            "MultiCropTransform(\n"
            f"  global: {c.n_global} x {c.global_size}px, scale {c.global_scale}, "
            f"blur p={list(c.blur_p[:2])[: c.n_global]}, solarize p={solarize}\n"
            f"  local:  {c.n_local} x {c.local_size}px, scale {c.local_scale}, "
            f"blur p={c.blur_p[2]}\n"
            f"  every crop: {c.interpolation}, flip p={c.flip_p}, jitter {c.jitter} "
            f"p={c.jitter_p}, grayscale p={c.grayscale_p}\n"
            f"  output: {c.channels} channel(s), mean {c.mean}, std {c.std}\n)"
        )


def eval_resize_size(input_size: int, crop_fraction: float) -> int:
    """The short side DINO's evaluation view resizes to before its centre crop of ``input_size``:
    ``round(input_size / crop_fraction)`` (timm's ``crop_pct``; 224 -> 256 at 0.875)."""
    if isinstance(crop_fraction, bool) or not isinstance(crop_fraction, (int, float)) or not (
            0.0 < crop_fraction <= 1.0):
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    return round(input_size / crop_fraction)


class EvalTransform:
    """Deterministic evaluation view: bicubic resize of the short side to ``resize_size``, centre
    crop of ``crop_size``, same channel handling and normalisation as training.

    Returns float32 ``[channels, crop_size, crop_size]``. ImageNet: 256 -> 224.
    """

    def __init__(self, crop_size: int = 224, resize_size: int = 256,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 channels: int = 3, interpolation: str = "bicubic"):
        if not _is_int(crop_size) or crop_size < 1:
            raise ValueError(f"crop_size must be an int > 0, got {crop_size!r}")
        if not _is_int(resize_size) or resize_size < crop_size:
            raise ValueError(f"resize_size must be an int >= crop_size ({crop_size}), "
                             f"got {resize_size!r}")
        if not _is_int(channels) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, "
                             f"got {interpolation!r}")
        self.crop_size, self.resize_size = int(crop_size), int(resize_size)
        self.channels, self.interpolation = channels, interpolation
        self.mean = per_channel("mean", mean, channels, owner="")
        self.std = per_channel("std", std, channels, owner="")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        mode = InterpolationMode(interpolation)
        self._pipeline = v2.Compose([
            v2.Resize(self.resize_size, interpolation=mode, antialias=True),
            v2.CenterCrop(self.crop_size),
            *([_Clamp01()] if channels in (1, 3) else []),  # bands keep their own range
            v2.Normalize(list(self.mean), list(self.std)),
        ])

    @classmethod
    def for_config(cls, config: MultiCropConfig, crop_fraction: float = 0.875) -> EvalTransform:
        """The eval view matching a training config: crop = ``global_size``, resize =
        ``round(global_size / crop_fraction)`` (0.875: 224 -> 256, 28 -> 32); 1.0 keeps borders."""
        return cls(config.global_size, eval_resize_size(config.global_size, crop_fraction), config.mean,
                   config.std, config.channels, config.interpolation)

    def __call__(self, img: Any) -> Tensor:
        return self._pipeline(to_image_tensor(img, self.channels))

    def __repr__(self) -> str:
        return (f"EvalTransform(resize {self.resize_size} ({self.interpolation}) -> centre crop "
                f"{self.crop_size}, channels={self.channels}, mean={self.mean}, std={self.std})")
