"""DINO's multi-crop augmentation (Caron et al. 2021, Sec. 3.1 and Appendix; BYOL's colour recipe).

``n_global`` crops of ``global_size`` (RandomResizedCrop scale ``global_scale``) and ``n_local``
crops of ``local_size`` (scale ``local_scale``); flip, colour jitter, grayscale, Gaussian blur
(probabilities 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals) and solarisation on global 2
only; then normalisation. The per-crop pipelines are built once; each call only samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"MultiCropConfig.{name} must be in [0, 1], got {p}")


def _check_scale(name: str, s: tuple[float, float]) -> None:
    if len(s) != 2 or not (0.0 < s[0] <= s[1] <= 1.0):
        raise ValueError(f"MultiCropConfig.{name} must be two ordered numbers in (0, 1], got {s}")


@dataclass
class MultiCropConfig:
    """Every size, scale and probability of the multi-crop recipe (defaults: DINO on ImageNet)."""

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
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
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MultiCropConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.n_global < 1:
            raise ValueError(f"MultiCropConfig.n_global must be >= 1, got {self.n_global}")
        if self.n_local < 0:
            raise ValueError(f"MultiCropConfig.n_local must be >= 0, got {self.n_local}")
        self.global_scale = tuple(self.global_scale)  # type: ignore[assignment]
        self.local_scale = tuple(self.local_scale)  # type: ignore[assignment]
        _check_scale("global_scale", self.global_scale)
        _check_scale("local_scale", self.local_scale)
        for name in ("flip_p", "jitter_p", "grayscale_p", "solarize_p"):
            _check_prob(name, getattr(self, name))
        if len(self.blur_p) != 3:
            raise ValueError(f"MultiCropConfig.blur_p needs 3 probabilities, got {self.blur_p}")
        for p in self.blur_p:
            _check_prob("blur_p", p)
        if self.channels not in (1, 3):
            raise ValueError(f"MultiCropConfig.channels must be 1 or 3, got {self.channels}")
        if self.channels == 1 and len(self.mean) == 3:
            self.mean, self.std = GRAY_MEAN, GRAY_STD
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"MultiCropConfig.mean/std must have {self.channels} values, got {self.mean}, {self.std}"
            )

    @classmethod
    def imagenet(cls, **changes: Any) -> MultiCropConfig:
        """DINO's ImageNet recipe (224 / 96 px crops)."""
        return cls(**changes)

    @classmethod
    def small(cls, image_size: int = 28, **changes: Any) -> MultiCropConfig:
        """For tiny sources (28-32 px, e.g. Fashion-MNIST): global crops at the source size, locals at
        about half, no blur or solarisation (meaningless at this scale), milder colour jitter."""
        g = max(4, image_size)
        base: dict[str, Any] = dict(
            global_size=g,
            local_size=max(4, (g // 2 + 3) // 4 * 4),
            n_local=4,
            global_scale=(0.4, 1.0),
            local_scale=(0.1, 0.4),
            jitter=(0.4, 0.4, 0.2, 0.1),
            blur_p=(0.0, 0.0, 0.0),
            solarize_p=0.0,
            grayscale_p=0.2,
            mean=(0.2860,) if changes.get("channels") == 1 else (0.2860,) * 3,
            std=(0.3530,) if changes.get("channels") == 1 else (0.3530,) * 3,
        )
        base.update(changes)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists for tuples), for YAML."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultiCropConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MultiCropConfig keys {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def to_image_tensor(img: Any, channels: int) -> Tensor:
    """PIL image (any mode) or tensor (uint8 or float, 2-D or [C, H, W]) -> float [channels, H, W]
    in [0, 1]. RGBA is composited on white; grayscale is repeated to RGB when 3 channels are asked."""
    if isinstance(img, Image.Image):
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        img = img.convert("L" if channels == 1 else "RGB")
        t = v2.functional.pil_to_tensor(img)
    elif isinstance(img, Tensor):
        t = img
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3:
            raise ValueError(f"image tensor must be [H, W] or [C, H, W], got shape {tuple(t.shape)}")
        if t.shape[0] == 4:
            alpha = t[3:].float() / (255.0 if t.dtype == torch.uint8 else 1.0)
            rgb = t[:3].float() / (255.0 if t.dtype == torch.uint8 else 1.0)
            t = rgb * alpha + (1 - alpha)
        if t.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must have 1, 3 or 4 channels, got {t.shape[0]}")
    else:
        raise TypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.shape[0] == 1 and channels == 3:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 3 and channels == 1:
        t = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]).unsqueeze(0)
    return t.contiguous()


class _Clamp01(torch.nn.Module):
    """Keep pixel values in [0, 1] after colour ops (picklable, unlike a lambda)."""

    def forward(self, t: Tensor) -> Tensor:
        return t.clamp(0.0, 1.0)


def _crop_pipeline(cfg: MultiCropConfig, size: int, scale: tuple[float, float], blur_p: float,
                   solarize_p: float) -> v2.Compose:
    steps: list[Any] = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
    ]
    b, c, s, h = cfg.jitter
    if cfg.channels == 1:
        s, h = 0.0, 0.0
    if cfg.jitter_p > 0 and any((b, c, s, h)):
        steps.append(v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=cfg.jitter_p))
    if cfg.channels == 3 and cfg.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(cfg.grayscale_p))
    if blur_p > 0:
        k = min(cfg.blur_kernel, size - 1 if size % 2 == 0 else size)
        k = max(3, k if k % 2 == 1 else k - 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(k, sigma=cfg.blur_sigma)], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=0.5, p=solarize_p))  # float images in [0, 1]
    steps.append(_Clamp01())
    steps.append(v2.Normalize(cfg.mean, cfg.std))
    return v2.Compose(steps)


class MultiCropTransform:
    """Image -> ``{"global_views": [Tensor C x G x G], "local_views": [Tensor C x L x L]}``."""

    def __init__(self, config: MultiCropConfig | None = None):
        self.config = cfg = config or MultiCropConfig()
        g_blur = [cfg.blur_p[0], cfg.blur_p[1]] + [cfg.blur_p[1]] * max(0, cfg.n_global - 2)
        g_sol = [0.0, cfg.solarize_p] + [0.0] * max(0, cfg.n_global - 2)
        self.global_crops = [
            _crop_pipeline(cfg, cfg.global_size, cfg.global_scale, g_blur[i], g_sol[i])
            for i in range(cfg.n_global)
        ]
        self.local_crop = _crop_pipeline(cfg, cfg.local_size, cfg.local_scale, cfg.blur_p[2], 0.0)

    def __call__(self, img: Any) -> dict[str, list[Tensor]]:
        x = to_image_tensor(img, self.config.channels)
        return {
            "global_views": [t(x) for t in self.global_crops],
            "local_views": [self.local_crop(x) for _ in range(self.config.n_local)],
        }

    def __repr__(self) -> str:
        c = self.config
        return (f"MultiCropTransform({c.n_global} x {c.global_size}px scale {c.global_scale}, "
                f"{c.n_local} x {c.local_size}px scale {c.local_scale}, channels={c.channels})")


@dataclass
class EvalTransform:
    """Deterministic evaluation view: bicubic resize to ``resize_size``, centre crop ``crop_size``."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    _pipeline: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._pipeline = v2.Compose([
            v2.Resize(self.resize_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(self.crop_size),
            _Clamp01(),
            v2.Normalize(self.mean, self.std),
        ])

    @classmethod
    def for_config(cls, cfg: MultiCropConfig) -> EvalTransform:
        """Same size, channels and normalisation as training (resize = crop / 0.875, or identity
        for tiny images where a crop would cut the object)."""
        resize = cfg.global_size if cfg.global_size <= 64 else round(cfg.global_size / 0.875)
        return cls(cfg.global_size, resize, tuple(cfg.mean), tuple(cfg.std), cfg.channels)

    def __call__(self, img: Any) -> Tensor:
        return self._pipeline(to_image_tensor(img, self.channels))
