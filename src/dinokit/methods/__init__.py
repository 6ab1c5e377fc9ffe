"""DINO-family methods: ``nn.Module``s with ``forward(global_views, local_views, images)``."""

from dinokit.methods.base import MethodOutput, SelfDistillationMethod
from dinokit.methods.dino import DINO, DINOOutput
from dinokit.methods.dinov2 import DINOv2, DINOv2Output
from dinokit.methods.dinov3 import DINOv3
from dinokit.methods.distill import Distillation
from dinokit.methods.ibot import IBOT

__all__ = ["DINO", "IBOT", "DINOOutput", "DINOv2", "DINOv2Output", "DINOv3", "Distillation", "MethodOutput",
           "SelfDistillationMethod"]
