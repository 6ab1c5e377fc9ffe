"""dinokit: DINO-family self-supervised learning for vision."""

from dinokit.backbones import Backbone, BackboneOutput, build_backbone
from dinokit.export import export_backbone, load_backbone
from dinokit.heads import DINOHead
from dinokit.losses import DINOLoss
from dinokit.methods import DINO, DINOOutput, DINOv2, DINOv3

__version__ = "0.1.0"


def __getattr__(name: str):
    """``dinokit.DINOEstimator`` is imported on first use (scikit-learn is only needed there)."""
    if name == "DINOEstimator":
        from dinokit.estimator import DINOEstimator

        return DINOEstimator
    raise AttributeError(f"module 'dinokit' has no attribute {name!r}")

__all__ = [
    "DINO",
    "Backbone",
    "BackboneOutput",
    "DINOEstimator",
    "DINOHead",
    "DINOLoss",
    "DINOOutput",
    "DINOv2",
    "DINOv3",
    "build_backbone",
    "export_backbone",
    "load_backbone",
]
