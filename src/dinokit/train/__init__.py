"""Training: the Lightning module, the plain trainer, the resumable loader, builders and ``fit``."""

from dinokit.train.module import DINOModule, unpack_batch
from dinokit.train.trainer import DINOTrainer, EpochStats

__all__ = ["DINOModule", "DINOTrainer", "EpochStats", "unpack_batch"]
