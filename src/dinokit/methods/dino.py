"""DINO: self-distillation with no labels (Caron et al., ICCV 2021).

The student sees every crop (global and local), the teacher only the global crops; the loss is
the cross-entropy between the centred, sharpened teacher distribution and the student's over all
cross-view pairs. The teacher is an EMA of the student. A preset of
:class:`~dinokit.methods.composed.ComposedMethod` with one term, :class:`~dinokit.methods.terms.DINOClsTerm`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dinokit.backbones import Backbone
from dinokit.methods.composed import ComposedMethod
from dinokit.methods.outputs import DINOOutput
from dinokit.methods.registry import make_backbone, method_spec, register_method, resolve_settings
from dinokit.methods.seed_keywords import apply_seed_keywords
from dinokit.methods.terms import DINOClsTerm
from dinokit.settings import MethodSettings

__all__ = ["DINO", "DINOOutput", "dino"]

DEFAULT_BACKBONE = "vit_small_patch16_224"


class DINO(ComposedMethod):
    """DINO with multi-crop, an EMA teacher, centring and teacher-temperature warm-up.

    The keywords are stable-pretraining's ``DINO`` (aliases of the settings named in brackets);
    every other knob is in ``settings``. A keyword left at its default defers to ``settings``.

    Args:
        encoder_name: timm model name (ViTs are built with ``dynamic_img_size=True`` so 224- and
            96-pixel crops share one model), ``"torchvision/<name>"``, an ``nn.Module`` or a
            :class:`~dinokit.backbones.Backbone` [``backbone.name``].
        projector_hidden_dim: hidden width of the head MLP (2048) [``heads.hidden_dim``].
        projector_bottleneck_dim: bottleneck width before the prototypes (256) [``heads.bottleneck_dim``].
        n_prototypes: prototypes ``K`` (65536) [``dino.n_prototypes``].
        temperature_student: ``tau_s`` (0.1) [``dino.student_temperature``].
        temperature_teacher_warmup: teacher temperature at epoch 0 (0.04) [``teacher.warmup_temperature``].
        temperature_teacher: teacher temperature after the warm-up (0.07), reached at epoch
            ``warmup_epochs_temperature_teacher`` - 1 as DINO's ``np.linspace`` [``teacher.temperature``].
        warmup_epochs_temperature_teacher: warm-up epochs of the teacher temperature (30)
            [``teacher.warmup_epochs``].
        center_momentum: EMA momentum of the centre (0.9) [``teacher.center_momentum``].
        ema_decay_start, ema_decay_end: teacher EMA momentum, cosine 0.996 -> 1.0
            [``teacher.momentum``, ``teacher.final_momentum``].
        encoder_kwargs: extra arguments for ``timm.create_model`` (e.g. ``img_size``) [``backbone.kwargs``].
        pretrained: load published weights for a named encoder [``backbone.pretrained``].
        settings: :class:`~dinokit.settings.MethodSettings` for everything else (head layers,
            BatchNorm and weight norm, centring, registers, stochastic depth, ...); ``None`` fields
            are DINO's official choices.

    Example::

        model = dinokit.DINO("vit_small_patch16_224")
        global_views = [torch.randn(8, 3, 224, 224), torch.randn(8, 3, 224, 224)]
        local_views = [torch.randn(8, 3, 96, 96) for _ in range(6)]
        out = model(global_views=global_views, local_views=local_views)
        out.loss.backward()
    """

    output_class = DINOOutput

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_hidden_dim: int = 2048,
        projector_bottleneck_dim: int = 256,
        n_prototypes: int = 65536,
        temperature_student: float = 0.1,
        temperature_teacher_warmup: float = 0.04,
        temperature_teacher: float = 0.07,
        warmup_epochs_temperature_teacher: int = 30,
        center_momentum: float = 0.9,
        ema_decay_start: float = 0.996,
        ema_decay_end: float = 1.0,
        encoder_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        *,
        settings: MethodSettings | None = None,
    ):
        given = None if isinstance(encoder_name, str) else encoder_name
        keywords = {
            "backbone.name": (encoder_name if given is None else DEFAULT_BACKBONE, DEFAULT_BACKBONE),
            "heads.hidden_dim": (projector_hidden_dim, 2048),
            "heads.bottleneck_dim": (projector_bottleneck_dim, 256),
            "dino.n_prototypes": (n_prototypes, 65536),
            "dino.student_temperature": (temperature_student, 0.1),
            "teacher.warmup_temperature": (temperature_teacher_warmup, 0.04),
            "teacher.temperature": (temperature_teacher, 0.07),
            "teacher.warmup_epochs": (warmup_epochs_temperature_teacher, 30),
            "teacher.center_momentum": (center_momentum, 0.9),
            "teacher.momentum": (ema_decay_start, 0.996),
            "teacher.final_momentum": (ema_decay_end, 1.0),
            "backbone.kwargs": (dict(encoder_kwargs or {}), {}),
            "backbone.pretrained": (pretrained, False),
        }
        names = dict(zip(keywords, ("encoder_name", "projector_hidden_dim", "projector_bottleneck_dim",
                                    "n_prototypes", "temperature_student", "temperature_teacher_warmup",
                                    "temperature_teacher",
                                    "warmup_epochs_temperature_teacher", "center_momentum", "ema_decay_start",
                                    "ema_decay_end", "encoder_kwargs", "pretrained"), strict=True))
        spec = method_spec("dino")
        s = resolve_settings(spec, apply_seed_keywords(settings, keywords, names))
        backbone = make_backbone(spec, s.backbone, given)
        super().__init__(backbone, [DINOClsTerm(s.dino, s.heads, s.teacher)], teacher=s.teacher,
                         temperature_endpoint=spec.temperature_endpoint, rules=spec.training)
        self.settings = s
        self.n_prototypes = s.dino.n_prototypes

    @property
    def dino_loss(self) -> nn.Module:
        """The CLS term's loss (temperature and EMA centre)."""
        return self.term("cls").dino_loss


@register_method(
    "dino", sections=("dino",),
    official={"teacher.momentum": 0.996, "teacher.warmup_unit": "epoch", "teacher.centering": "ema",
              "heads.norm_last_layer": True, "heads.weight_norm": True, "ibot.shared_head": False,
              "backbone.n_registers": 0},
    training={"no_decay_rule": "dino", "clip_mode": "per_param", "freeze_last_layer_mode": "cancel_grad"},
    summary="DINO (Caron et al. 2021): CLS self-distillation, EMA centring",
)
def dino(backbone: Backbone, settings: MethodSettings) -> DINO:
    """DINO from its settings (``dino``, ``heads``, ``teacher``)."""
    return DINO(backbone, settings=settings)
