"""iBOT (Zhou et al., ICLR 2022): DINO's CLS self-distillation plus masked-patch self-distillation,
with one shared head and EMA centring for both (no Sinkhorn-Knopp, no KoLeo). A preset of
:class:`~dinokit.methods.composed.ComposedMethod` with the terms ``cls`` and ``patch``."""

from __future__ import annotations

from typing import Any

from torch import nn

from dinokit.methods.dinov2 import DINOv2


class IBOT(DINOv2):
    """iBOT: :class:`DINOv2` with ``shared_head=True``, ``centering="ema"``, no KoLeo and the
    teacher temperature warmed up per epoch; other arguments as :class:`DINOv2`."""

    def __init__(self, encoder_name: str | nn.Module = "vit_small_patch16_224", **kwargs: Any):
        kwargs.setdefault("shared_head", True)
        kwargs.setdefault("centering", "ema")
        kwargs.setdefault("koleo_weight", 0.0)
        kwargs.setdefault("ema_decay_start", 0.996)
        kwargs.setdefault("norm_last_layer", True)
        kwargs.setdefault("temperature_warmup_unit", "epoch")
        super().__init__(encoder_name, **kwargs)
