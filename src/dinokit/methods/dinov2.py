"""DINOv2 (Oquab et al., TMLR 2024): the DINO CLS loss and the iBOT masked-patch loss (Zhou et
al. 2022), both centred with Sinkhorn-Knopp, plus the KoLeo regulariser on the student's global
CLS features; optional register tokens (Darcet et al. 2024). A preset of
:class:`~dinokit.methods.composed.ComposedMethod` with the terms ``cls``, ``patch`` and ``koleo``.

Defaults follow the official code: the published ViT-L/14 and ViT-g/14 recipes (Sinkhorn-Knopp,
untied heads, 65536 prototypes each, trainable weight-norm gain of the prototypes), EMA momentum
0.992 -> 1, the teacher temperature warmed up per iteration. ``teacher.centering="ema"`` with
``ibot.shared_head=True`` gives the official ``ssl_default_config`` instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dinokit.backbones import Backbone
from dinokit.methods.composed import ComposedMethod
from dinokit.methods.dino import DEFAULT_BACKBONE
from dinokit.methods.outputs import DINOv2Output
from dinokit.methods.registry import (
    DINOV2_TRAINING,
    make_backbone,
    method_spec,
    register_method,
    resolve_settings,
)
from dinokit.methods.seed_keywords import apply_seed_keywords
from dinokit.methods.terms import DINOClsTerm, IBOTPatchTerm, KoLeoTerm, LossTerm
from dinokit.settings import MethodSettings

__all__ = ["DINOv2", "DINOv2Output", "dinov2", "dinov2_terms"]


def dinov2_terms(s: MethodSettings) -> list[LossTerm]:
    """The DINOv2 terms from resolved settings: DINO CLS, iBOT patch, KoLeo; a term whose weight
    is 0 is left out (the CLS term always stays)."""
    terms: list[LossTerm] = [DINOClsTerm(s.dino, s.heads, s.teacher)]
    if s.ibot.weight > 0:
        terms.append(IBOTPatchTerm(s.ibot, s.heads, s.teacher))
    if s.koleo.weight > 0:
        terms.append(KoLeoTerm(s.koleo))
    return terms


class DINOv2(ComposedMethod):
    """DINOv2. The keywords are those of stable-pretraining's DINOv2/v3 family (aliases of the
    settings named in brackets); every other knob is in ``settings``, whose ``None`` fields are
    DINOv2's official choices. A keyword left at its default defers to ``settings``.

    Args:
        encoder_name: as :class:`~dinokit.DINO` [``backbone.name``].
        n_register_tokens: register tokens of the ViT (0) [``backbone.n_registers``].
        koleo_weight: weight of the KoLeo term (0.1) [``koleo.weight``].
        projector_hidden_dim, projector_bottleneck_dim: head widths (2048, 256) [``heads.*``].
        n_prototypes, n_patch_prototypes: prototypes of the CLS and patch heads (65536 each)
            [``dino.n_prototypes``, ``ibot.n_prototypes``].
        mask_ratio: ratio of the fallback random masks when the batch brings none (0.3).
        patch_loss_weight: weight of the iBOT term (1.0) [``ibot.weight``].
        temperature_student: ``tau_s`` of both terms (0.1) [``dino/ibot.student_temperature``].
        temperature_teacher: teacher temperature after the warm-up (0.07) [``teacher.temperature``].
        ema_decay_start, ema_decay_end: teacher EMA momentum (None = official 0.992; 1.0)
            [``teacher.momentum``, ``teacher.final_momentum``].
        encoder_kwargs, pretrained: as :class:`~dinokit.DINO` [``backbone.kwargs``, ``backbone.pretrained``].
        settings: :class:`~dinokit.settings.MethodSettings` (centring, head sharing and weight
            norm, temperature warm-up, KoLeo over all processes, ...).
    """

    output_class = DINOv2Output
    method_name = "dinov2"

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        n_register_tokens: int | None = None,
        koleo_weight: float = 0.1,
        projector_hidden_dim: int = 2048,
        projector_bottleneck_dim: int = 256,
        n_prototypes: int = 65536,
        n_patch_prototypes: int = 65536,
        mask_ratio: float = 0.3,
        patch_loss_weight: float = 1.0,
        temperature_student: float = 0.1,
        temperature_teacher: float = 0.07,
        ema_decay_start: float | None = None,
        ema_decay_end: float = 1.0,
        encoder_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        *,
        settings: MethodSettings | None = None,
    ):
        given = None if isinstance(encoder_name, str) else encoder_name
        keywords = {
            "backbone.name": (encoder_name if given is None else DEFAULT_BACKBONE, DEFAULT_BACKBONE),
            "backbone.n_registers": (n_register_tokens, None),
            "koleo.weight": (koleo_weight, 0.1),
            "heads.hidden_dim": (projector_hidden_dim, 2048),
            "heads.bottleneck_dim": (projector_bottleneck_dim, 256),
            "dino.n_prototypes": (n_prototypes, 65536),
            "ibot.n_prototypes": (n_patch_prototypes, 65536),
            "ibot.weight": (patch_loss_weight, 1.0),
            "dino.student_temperature": (temperature_student, 0.1),
            "ibot.student_temperature": (temperature_student, 0.1),
            "teacher.temperature": (temperature_teacher, 0.07),
            "teacher.momentum": (ema_decay_start, None),
            "teacher.final_momentum": (ema_decay_end, 1.0),
            "backbone.kwargs": (dict(encoder_kwargs or {}), {}),
            "backbone.pretrained": (pretrained, False),
        }
        names = {"backbone.name": "encoder_name", "backbone.n_registers": "n_register_tokens",
                 "koleo.weight": "koleo_weight", "heads.hidden_dim": "projector_hidden_dim",
                 "heads.bottleneck_dim": "projector_bottleneck_dim", "dino.n_prototypes": "n_prototypes",
                 "ibot.n_prototypes": "n_patch_prototypes", "ibot.weight": "patch_loss_weight",
                 "dino.student_temperature": "temperature_student",
                 "ibot.student_temperature": "temperature_student",
                 "teacher.temperature": "temperature_teacher", "teacher.momentum": "ema_decay_start",
                 "teacher.final_momentum": "ema_decay_end", "backbone.kwargs": "encoder_kwargs",
                 "backbone.pretrained": "pretrained"}
        self._build(given, apply_seed_keywords(settings, keywords, names), mask_ratio)

    def _build(self, given: nn.Module | None, settings: MethodSettings, mask_ratio: float) -> None:
        spec = method_spec(self.method_name)
        s = resolve_settings(spec, settings)
        if s.backbone.n_registers is not None and s.backbone.n_registers < 0:
            raise ValueError(f"n_register_tokens must be >= 0, got {s.backbone.n_registers}")
        backbone = make_backbone(spec, s.backbone, given)
        if not backbone.has_cls_token:
            raise TypeError(f"{type(self).__name__} needs a ViT with a CLS token; "
                            f"{type(backbone).__name__} has none")
        terms = self.make_terms(s)
        ComposedMethod.__init__(self, backbone, terms, teacher=s.teacher, mask_ratio=mask_ratio,
                                temperature_endpoint=spec.temperature_endpoint, rules=spec.training)
        self.settings = s
        self.n_prototypes, self.n_patch_prototypes = s.dino.n_prototypes, s.ibot.n_prototypes
        self.n_register_tokens = s.backbone.n_registers or 0
        self.shared_head, self.centering = bool(s.ibot.shared_head), s.teacher.centering
        self.patch_loss_weight, self.koleo_weight = s.ibot.weight, s.koleo.weight

    def make_terms(self, s: MethodSettings) -> list[LossTerm]:
        return dinov2_terms(s)

    @property
    def cls_head(self) -> nn.Module:
        """The student's CLS head."""
        return self.student["head"]

    @property
    def patch_head(self) -> nn.Module:
        """The student's patch head (the CLS head when shared)."""
        return self.student["head" if self.shared_head else "patch_head"]


@register_method(
    "dinov2", sections=("dino", "ibot", "koleo"), needs_masks=True,
    official={"teacher.momentum": 0.992, "teacher.warmup_unit": "step", "teacher.centering": "sinkhorn",
              "heads.norm_last_layer": False, "heads.weight_norm": True, "ibot.shared_head": False,
              "backbone.n_registers": 0},
    training={"no_decay_rule": "dinov2", **DINOV2_TRAINING},
    summary="DINOv2 (Oquab et al. 2024): CLS + iBOT with Sinkhorn-Knopp, KoLeo",
    drop_path_uniform=True, drop_path_subset_above=0.1,
)
def dinov2(backbone: Backbone, settings: MethodSettings) -> DINOv2:
    """DINOv2 from its settings (``dino``, ``ibot``, ``koleo``, ``heads``, ``teacher``)."""
    return DINOv2(backbone, settings=settings)
