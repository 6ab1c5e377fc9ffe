"""dinokit: DINO-family self-supervised learning for vision.

The names below are imported on first use (PEP 562), so ``import dinokit`` is cheap and a
command or script pays only for the parts it touches (Lightning for training, scikit-learn for the
estimator).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "Backbone": "dinokit.backbones",
    "BackboneOutput": "dinokit.backbones",
    "build_backbone": "dinokit.backbones",
    "export_backbone": "dinokit.export",
    "load_backbone": "dinokit.export",
    "DINOHead": "dinokit.heads",
    "DINOLoss": "dinokit.losses",
    "DINO": "dinokit.methods",
    "DINOOutput": "dinokit.methods",
    "DINOv2": "dinokit.methods",
    "DINOv3": "dinokit.methods",
    "Distillation": "dinokit.methods",
    "DINOEstimator": "dinokit.estimator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dinokit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
