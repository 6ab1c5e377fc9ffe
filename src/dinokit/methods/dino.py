"""DINO: self-distillation with no labels (Caron et al., ICCV 2021).

The student sees every crop (global and local), the teacher only the global crops; the loss is
the cross-entropy between the centred, sharpened teacher distribution and the student's over all
cross-view pairs. The teacher is an EMA of the student. A preset of
:class:`~dinokit.methods.composed.ComposedMethod` with one term, :class:`~dinokit.methods.terms.DINOClsTerm`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dinokit.backbones import build_backbone
from dinokit.methods.composed import ComposedMethod
from dinokit.methods.outputs import DINOOutput
from dinokit.methods.terms import DINOClsTerm

__all__ = ["DINO", "DINOOutput"]


class DINO(ComposedMethod):
    """DINO with multi-crop, an EMA teacher, centring and teacher-temperature warm-up.

    Args:
        encoder_name: timm model name (ViTs are built with ``dynamic_img_size=True`` so 224- and
            96-pixel crops share one model), ``"torchvision/<name>"``, an ``nn.Module`` or a
            :class:`~dinokit.backbones.Backbone`.
        projector_hidden_dim: hidden width of the 3-layer head MLP (2048).
        projector_bottleneck_dim: bottleneck width before the prototypes (256).
        n_prototypes: prototypes ``K`` (65536).
        temperature_student: ``tau_s`` (0.1).
        temperature_teacher_warmup: teacher temperature at epoch 0 (0.04).
        temperature_teacher: teacher temperature after the warm-up (0.07), reached at epoch
            ``warmup_epochs_temperature_teacher`` - 1 as DINO's ``np.linspace``.
        warmup_epochs_temperature_teacher: warm-up epochs of the teacher temperature (30).
        center_momentum: EMA momentum of the centre (0.9).
        ema_decay_start, ema_decay_end: teacher EMA momentum, cosine 0.996 -> 1.0.
        encoder_kwargs: extra arguments for ``timm.create_model`` (e.g. ``img_size``).
        pretrained: load published weights for a named encoder.
        norm_last_layer: fix the prototype gain at 1 (True, stable) or train it (False).
        projector_batch_norm: BatchNorm in the head MLP (for CNN backbones).
        projector_layers: layers of the head MLP (3).
        total_steps: optimiser steps of the run, for the momentum cosine (or call
            :meth:`set_total_steps`).
        check_finite: raise a ``ValueError`` on non-finite logits (one host sync per step).

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
        norm_last_layer: bool = True,
        projector_batch_norm: bool = False,
        projector_layers: int = 3,
        total_steps: int | None = None,
        check_finite: bool = True,
    ):
        backbone = build_backbone(encoder_name, pretrained=pretrained, encoder_kwargs=encoder_kwargs)
        head_kwargs = dict(hidden_dim=projector_hidden_dim, bottleneck_dim=projector_bottleneck_dim,
                           n_layers=projector_layers, use_bn=projector_batch_norm,
                           norm_last_layer=norm_last_layer)
        term = DINOClsTerm(n_prototypes, head_kwargs, student_temp=temperature_student,
                           centering="ema", center_momentum=center_momentum)
        super().__init__(
            backbone, [term],
            ema_decay_start=ema_decay_start, ema_decay_end=ema_decay_end,
            temperature_teacher_warmup=temperature_teacher_warmup,
            temperature_teacher=temperature_teacher,
            warmup_epochs_temperature_teacher=warmup_epochs_temperature_teacher,
            temperature_warmup_unit="epoch", total_steps=total_steps, check_finite=check_finite,
        )
        self.n_prototypes = n_prototypes

    @property
    def dino_loss(self) -> nn.Module:
        """The CLS term's loss (temperature and EMA centre)."""
        return self.term("cls").dino_loss
