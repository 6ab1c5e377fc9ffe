"""DINO: self-distillation with no labels (Caron et al., ICCV 2021).

The student sees every crop (global and local), the teacher only the global crops; the loss is
the cross-entropy between the centred, sharpened teacher distribution and the student's over all
cross-view pairs. The teacher is an EMA of the student.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dinokit.backbones import build_backbone
from dinokit.heads import DINOHead
from dinokit.losses.dino import DINOLoss, teacher_diagnostics
from dinokit.methods.base import MethodOutput, SelfDistillationMethod, check_views, forward_views


@dataclass
class DINOOutput(MethodOutput):
    """Output of :class:`DINO`.

    Attributes:
        loss: the DINO loss (a zero when only ``images`` were given).
        embedding: teacher CLS features, ``[n_global * B, D]`` in training, ``[B, D]`` for images.
        teacher_logits: ``[n_global, B, K]`` (detached).
        student_logits: ``[n_views, B, K]``, global views first.
        teacher_entropy: mean entropy of the teacher distribution (nats, detached).
        teacher_kl_uniform: KL(mean teacher distribution || uniform) (nats, detached).
        teacher_temperature: the temperature used this step.
    """

    teacher_logits: Tensor | None = None
    student_logits: Tensor | None = None
    teacher_entropy: Tensor | None = None
    teacher_kl_uniform: Tensor | None = None
    teacher_temperature: float | None = None


class DINO(SelfDistillationMethod):
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
        temperature_teacher: teacher temperature after the warm-up (0.07).
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
        head = DINOHead(
            backbone.embed_dim,
            n_prototypes,
            hidden_dim=projector_hidden_dim,
            bottleneck_dim=projector_bottleneck_dim,
            n_layers=projector_layers,
            use_bn=projector_batch_norm,
            norm_last_layer=norm_last_layer,
        )
        super().__init__(
            nn.ModuleDict({"backbone": backbone, "head": head}),
            ema_decay_start=ema_decay_start,
            ema_decay_end=ema_decay_end,
            temperature_teacher_warmup=temperature_teacher_warmup,
            temperature_teacher=temperature_teacher,
            warmup_epochs_temperature_teacher=warmup_epochs_temperature_teacher,
            total_steps=total_steps,
            check_finite=check_finite,
        )
        self.n_prototypes = n_prototypes
        self.dino_loss = DINOLoss(n_prototypes, temperature_student, center_momentum)

    def forward(
        self,
        global_views: Sequence[Tensor] | None = None,
        local_views: Sequence[Tensor] | None = None,
        images: Tensor | None = None,
    ) -> DINOOutput:
        """Training step on multi-crop views, or the teacher embedding of ``images``.

        Args:
            global_views: ``n_global`` tensors ``[B, C, H, W]`` (e.g. two 224 crops).
            local_views: ``n_local`` tensors ``[B, C, h, w]`` (e.g. 96 crops); may be empty.
            images: ``[B, C, H, W]``; when given, returns the teacher CLS embedding only (no
                gradient) and a zero loss.
        """
        if images is not None:
            emb = self.embed(images)
            return DINOOutput(loss=emb.new_zeros(()), embedding=emb)
        g, lv = check_views(global_views, local_views, self.student_backbone.in_chans)
        n_g, b = len(g), g[0].shape[0]
        teacher_temp = self.teacher_temperature

        with torch.no_grad():
            t_cls = torch.cat([o.cls for o in forward_views(self.teacher_backbone, g)])
            t_logits = self.teacher_head(t_cls).view(n_g, b, -1)
        s_cls = torch.cat([o.cls for o in forward_views(self.student_backbone, g + lv)])
        s_logits = self.student_head(s_cls).view(n_g + len(lv), b, -1)
        self._check_finite("student_logits", s_logits)
        self._check_finite("teacher_logits", t_logits)

        t_probs = self.dino_loss.teacher_probs(t_logits, teacher_temp)
        loss = self.dino_loss(s_logits, t_probs)
        diag = teacher_diagnostics(t_probs)
        if self.training:
            self.dino_loss.update_center(t_logits)
        return DINOOutput(
            loss=loss,
            embedding=t_cls.detach(),
            teacher_logits=t_logits.detach(),
            student_logits=s_logits,
            teacher_entropy=diag.entropy,
            teacher_kl_uniform=diag.kl_uniform,
            teacher_temperature=teacher_temp,
        )


