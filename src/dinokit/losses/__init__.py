"""Loss terms of the DINO family, one file per term of the papers."""

from dinokit.losses.centering import EMACenter
from dinokit.losses.dino import DINOLoss, collapse_status, dino_cross_entropy, teacher_diagnostics
from dinokit.losses.gram import gram_loss
from dinokit.losses.ibot import IBOTPatchLoss, ibot_patch_loss
from dinokit.losses.koleo import koleo_loss
from dinokit.losses.sinkhorn import sinkhorn_knopp

__all__ = [
    "DINOLoss",
    "EMACenter",
    "IBOTPatchLoss",
    "collapse_status",
    "dino_cross_entropy",
    "gram_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "sinkhorn_knopp",
    "teacher_diagnostics",
]
