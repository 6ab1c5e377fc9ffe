"""iBOT (Zhou et al., ICLR 2022): DINO's CLS self-distillation plus masked-patch self-distillation,
with one shared head and EMA centring for both (no Sinkhorn-Knopp, no KoLeo). A preset of
:class:`~dinokit.methods.composed.ComposedMethod` with the terms ``cls`` and ``patch``."""

from __future__ import annotations

from dinokit.backbones import Backbone
from dinokit.methods.dinov2 import DINOv2
from dinokit.methods.registry import register_method
from dinokit.methods.terms import DINOClsTerm, IBOTPatchTerm, LossTerm
from dinokit.settings import MethodSettings


class IBOT(DINOv2):
    """iBOT: the keywords of :class:`DINOv2`, with iBOT's official choices for the settings left
    ``None`` (a shared head, EMA centring, EMA momentum 0.996, a fixed prototype gain, the teacher
    temperature warmed up per epoch) and no KoLeo."""

    method_name = "ibot"

    def make_terms(self, s: MethodSettings) -> list[LossTerm]:
        terms: list[LossTerm] = [DINOClsTerm(s.dino, s.heads, s.teacher)]
        if s.ibot.weight > 0:
            terms.append(IBOTPatchTerm(s.ibot, s.heads, s.teacher))
        return terms


@register_method(
    "ibot", sections=("dino", "ibot"), needs_masks=True,
    official={"teacher.momentum": 0.996, "teacher.warmup_unit": "epoch", "teacher.centering": "ema",
              "heads.norm_last_layer": True, "heads.weight_norm": True, "ibot.shared_head": True,
              "backbone.n_registers": 0},
    training={"no_decay_rule": "dino", "clip_mode": "per_param", "freeze_last_layer_mode": "cancel_grad"},
    summary="iBOT (Zhou et al. 2022): CLS + masked-patch self-distillation, shared head",
)
def ibot(backbone: Backbone, settings: MethodSettings) -> IBOT:
    """iBOT from its settings (``dino``, ``ibot``, ``heads``, ``teacher``)."""
    return IBOT(backbone, settings=settings)
