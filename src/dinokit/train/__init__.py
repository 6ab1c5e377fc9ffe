"""Training: the Lightning module, the resumable loader, builders and the ``fit`` entry."""

from dinokit.train.module import DINOModule, unpack_batch

__all__ = ["DINOModule", "unpack_batch"]
