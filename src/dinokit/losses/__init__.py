"""Loss terms of the DINO family, one file per term of the papers."""

from dinokit.losses.centering import EMACenter, valid_mean
from dinokit.losses.dino import (
    DINOLoss,
    TeacherDiagnostics,
    collapse_status,
    dino_cross_entropy,
    teacher_diagnostics,
)
from dinokit.losses.gram import gram_loss, resample_patch_grid
from dinokit.losses.ibot import IBOTPatchLoss, ibot_patch_loss, masked_token_weights
from dinokit.losses.koleo import koleo_loss, koleo_loss_over_crops
from dinokit.losses.sinkhorn import sinkhorn_knopp

__all__ = [
    "DINOLoss",
    "EMACenter",
    "IBOTPatchLoss",
    "TeacherDiagnostics",
    "collapse_status",
    "dino_cross_entropy",
    "gram_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "koleo_loss_over_crops",
    "masked_token_weights",
    "resample_patch_grid",
    "sinkhorn_knopp",
    "teacher_diagnostics",
    "valid_mean",
]
