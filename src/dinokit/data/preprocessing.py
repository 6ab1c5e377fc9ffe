"""One backbone, one preprocessing: the channels, normalisation and sizes its inputs had in training.

Training crops, the evaluation view (k-NN, linear probe, embed, viz) and an exported file all read
one :class:`Preprocessing`, so the same weights see the same pixels on every path (a run
directory rebuilds it from its config, an export stores it in its JSON metadata). The evaluation
view follows DINO's protocol: resize the short side to ``input_size / crop_fraction`` (224 -> 256),
centre crop ``input_size``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dinokit.data.multicrop import (
    INTERPOLATIONS,
    EvalTransform,
    MultiCropConfig,
    eval_resize_size,
    per_channel,
)


def _values(name: str, value: Any, channels: int) -> tuple[float, ...]:
    """One value per channel (the rule :class:`~dinokit.data.MultiCropConfig` applies)."""
    return per_channel(name, value, channels, owner="Preprocessing.")


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone's inputs look like: ``channels`` (1 = grey, 3 = RGB, any other count =
    multi-band images), per-channel ``mean`` and ``std`` of pixels in [0, 1] (of the float bands of
    multi-band images), the crop side ``input_size`` (the global crop size of training),
    the eval view's ``crop_fraction`` (resize the short side to ``round(input_size / crop_fraction)``,
    then centre crop; timm's ``crop_pct``) and the ``interpolation`` of resizing. The keys of
    :meth:`to_dict` are those of an export's ``preprocessing`` metadata."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    input_size: int = 224
    crop_fraction: float = 0.875
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"Preprocessing.channels must be an int >= 1, got {self.channels!r}")
        object.__setattr__(self, "mean", _values("mean", self.mean, self.channels))
        object.__setattr__(self, "std", _values("std", self.std, self.channels))
        if min(self.std) <= 0:
            raise ValueError(f"Preprocessing.std must be positive, got {self.std}")
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 1:
            raise ValueError(f"Preprocessing.input_size must be an int >= 1, got {self.input_size!r}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"Preprocessing.crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"Preprocessing.interpolation must be one of {list(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")

    @property
    def resize_size(self) -> int:
        """Short side before the centre crop: ``round(input_size / crop_fraction)`` (224 -> 256)."""
        return eval_resize_size(self.input_size, self.crop_fraction)

    @classmethod
    def from_multicrop(cls, config: Any, crop_fraction: float = 0.875) -> Preprocessing:
        """The preprocessing of a :class:`~dinokit.data.MultiCropConfig`: its channels, mean/std,
        interpolation and ``global_size``."""
        return cls(tuple(config.mean), tuple(config.std), int(config.channels), int(config.global_size),
                   float(crop_fraction), config.interpolation)

    @classmethod
    def default_for(cls, image_size: int, channels: int) -> Preprocessing:
        """For exports written before the preprocessing was stored: the crop preset dinokit trains
        such a backbone with (``small`` up to 64 px, else ImageNet's)."""
        mc = (MultiCropConfig.small(image_size, channels=channels) if image_size <= 64
              else MultiCropConfig(global_size=image_size, channels=channels))
        return cls.from_multicrop(mc)

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, floats, strings and lists (JSON/YAML-safe)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown or missing keys are an error naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"Preprocessing.from_dict needs a dict, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if v is not None}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown Preprocessing fields {unknown}")
        missing = sorted({"mean", "std"} - set(d))
        if missing:
            raise ValueError(f"Preprocessing needs the fields {missing}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def eval_transform(self) -> EvalTransform:
        """The deterministic evaluation view (an :class:`~dinokit.data.EvalTransform`)."""
        return EvalTransform(self.input_size, self.resize_size, self.mean, self.std, self.channels,
                             self.interpolation)

    def normalize(self, images: Tensor) -> Tensor:
        """``(images - mean) / std`` over dim -3 of float ``[..., C, H, W]`` pixels in [0, 1]."""
        shape = (self.channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return (images - mean) / std
