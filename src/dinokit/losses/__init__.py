"""Loss terms of the DINO family, one file per term of the papers."""

from dinokit.losses.centering import EMACenter
from dinokit.losses.dino import DINOLoss, collapse_status, dino_cross_entropy, teacher_diagnostics

__all__ = ["DINOLoss", "EMACenter", "collapse_status", "dino_cross_entropy", "teacher_diagnostics"]
