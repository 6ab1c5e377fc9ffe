"""DINOv2 (Oquab et al., TMLR 2024): the DINO CLS loss and the iBOT masked-patch loss (Zhou et
al. 2022), both centred with Sinkhorn-Knopp, plus the KoLeo regulariser on the student's global
CLS features; optional register tokens (Darcet et al. 2024). A preset of
:class:`~dinokit.methods.composed.ComposedMethod` with the terms ``cls``, ``patch`` and ``koleo``.

Defaults follow the official code: the published ViT-L/14 and ViT-g/14 recipes (Sinkhorn-Knopp,
untied heads, 65536 prototypes each, trainable weight-norm gain of the prototypes), EMA momentum
0.992 -> 1, the teacher temperature warmed up per iteration. ``centering="ema"`` with
``shared_head=True`` gives the official ``ssl_default_config`` instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dinokit.backbones import build_backbone
from dinokit.methods.composed import ComposedMethod
from dinokit.methods.outputs import DINOv2Output
from dinokit.methods.terms import DINOClsTerm, IBOTPatchTerm, KoLeoTerm, LossTerm

__all__ = ["DINOv2", "DINOv2Output", "dinov2_terms"]


def dinov2_terms(*, n_prototypes: int, n_patch_prototypes: int, head_kwargs: dict[str, Any],
                 temperature_student: float, centering: str, center_momentum: float,
                 sinkhorn_iterations: int, shared_head: bool, patch_loss_weight: float,
                 koleo_weight: float, koleo_all_processes: bool) -> list[LossTerm]:
    """The DINOv2 terms: DINO CLS, iBOT patch, KoLeo (weights 1, ``patch_loss_weight``,
    ``koleo_weight``); a term whose weight is 0 is left out."""
    common = dict(student_temp=temperature_student, centering=centering,
                  center_momentum=center_momentum, sinkhorn_iterations=sinkhorn_iterations)
    terms: list[LossTerm] = [DINOClsTerm(n_prototypes, head_kwargs, **common)]
    if patch_loss_weight > 0:
        terms.append(IBOTPatchTerm(n_patch_prototypes, head_kwargs, shared_head=shared_head,
                                   weight=patch_loss_weight, **common))
    if koleo_weight > 0:
        terms.append(KoLeoTerm(koleo_weight, all_processes=koleo_all_processes))
    return terms


class DINOv2(ComposedMethod):
    """DINOv2. Arguments as :class:`~dinokit.DINO`, plus:

    Args:
        n_patch_prototypes: prototypes of the iBOT patch head (65536).
        shared_head: one head for CLS and patch tokens (iBOT; DINOv2's default config).
        centering: ``"sinkhorn"`` (DINOv2's published recipes) or ``"ema"`` (softmax centring).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        patch_loss_weight, koleo_weight: weights of the iBOT and KoLeo terms (1.0, 0.1).
        koleo_all_processes: nearest neighbours searched over every process's batch (off, as
            the official code).
        mask_ratio: ratio of the fallback random masks when the batch brings none (0.3).
        n_register_tokens: register tokens of the ViT (0; DINOv3: 4).
        norm_last_layer: fix the prototype gain (False: DINOv2 trains it).
        weight_norm: weight-normalised prototypes (True; DINOv3's head has none).
        temperature_warmup_unit: ``"step"`` (DINOv2: per iteration) or ``"epoch"``.
    """

    output_class = DINOv2Output

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
        ema_decay_start: float = 0.992,
        ema_decay_end: float = 1.0,
        encoder_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        *,
        n_patch_prototypes: int = 65536,
        shared_head: bool = False,
        centering: str = "sinkhorn",
        sinkhorn_iterations: int = 3,
        patch_loss_weight: float = 1.0,
        koleo_weight: float = 0.1,
        koleo_all_processes: bool = False,
        mask_ratio: float = 0.3,
        n_register_tokens: int = 0,
        norm_last_layer: bool = False,
        weight_norm: bool = True,
        projector_layers: int = 3,
        temperature_warmup_unit: str = "step",
        extra_terms: list[LossTerm] | None = None,
        total_steps: int | None = None,
        check_finite: bool = True,
    ):
        if n_register_tokens < 0:
            raise ValueError(f"n_register_tokens must be >= 0, got {n_register_tokens}")
        backbone = build_backbone(encoder_name, pretrained=pretrained, num_registers=n_register_tokens,
                                  encoder_kwargs=encoder_kwargs)
        if not backbone.has_cls_token:
            raise TypeError(f"{type(self).__name__} needs a ViT with a CLS token; "
                            f"{type(backbone).__name__} has none")
        head_kwargs = dict(hidden_dim=projector_hidden_dim, bottleneck_dim=projector_bottleneck_dim,
                           n_layers=projector_layers, norm_last_layer=norm_last_layer,
                           weight_norm=weight_norm)
        terms = dinov2_terms(
            n_prototypes=n_prototypes, n_patch_prototypes=n_patch_prototypes, head_kwargs=head_kwargs,
            temperature_student=temperature_student, centering=centering,
            center_momentum=center_momentum, sinkhorn_iterations=sinkhorn_iterations,
            shared_head=shared_head, patch_loss_weight=patch_loss_weight, koleo_weight=koleo_weight,
            koleo_all_processes=koleo_all_processes,
        ) + list(extra_terms or [])
        super().__init__(
            backbone, terms, mask_ratio=mask_ratio,
            ema_decay_start=ema_decay_start, ema_decay_end=ema_decay_end,
            temperature_teacher_warmup=temperature_teacher_warmup,
            temperature_teacher=temperature_teacher,
            warmup_epochs_temperature_teacher=warmup_epochs_temperature_teacher,
            temperature_warmup_unit=temperature_warmup_unit, total_steps=total_steps,
            check_finite=check_finite,
        )
        self.n_prototypes, self.n_patch_prototypes = n_prototypes, n_patch_prototypes
        self.n_register_tokens = n_register_tokens
        self.shared_head, self.centering = shared_head, centering
        self.patch_loss_weight, self.koleo_weight = patch_loss_weight, koleo_weight

    @property
    def cls_head(self) -> nn.Module:
        """The student's CLS head (seed 004's name)."""
        return self.student["head"]

    @property
    def patch_head(self) -> nn.Module:
        """The student's patch head (the CLS head when shared)."""
        return self.student["head" if self.shared_head else "patch_head"]
