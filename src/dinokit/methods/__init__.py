"""DINO-family methods: ``nn.Module``s with ``forward(global_views, local_views, images)``."""

from dinokit.methods.base import MethodOutput, SelfDistillationMethod
from dinokit.methods.dino import DINO, DINOOutput

__all__ = ["DINO", "DINOOutput", "MethodOutput", "SelfDistillationMethod"]
