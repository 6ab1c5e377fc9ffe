"""The DINO CLS term (Caron et al. 2021, Eq. 1-4; DINOv2/v3's ``dino_loss``): cross-entropy between the
teacher's centred, sharpened CLS distribution on each global crop and the student's on every other
crop. Centring is DINO's EMA centre (``"ema"``) or Sinkhorn-Knopp (``"sinkhorn"``, DINOv2/v3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dinokit.heads import DINOHead
from dinokit.losses.dino import DINOLoss, dino_cross_entropy, teacher_diagnostics
from dinokit.losses.sinkhorn import sinkhorn_knopp
from dinokit.methods.terms.base import (
    GLOBAL_CLS,
    LOCAL_CLS,
    TEACHER_GLOBAL,
    LossTerm,
    StepFeatures,
    TermOutput,
    register_term,
)

CENTERINGS = ("ema", "sinkhorn")


@register_term
class DINOClsTerm(LossTerm):
    """Args:
        n_prototypes: ``K`` of the CLS head (``head`` in the student/teacher dicts).
        head_kwargs: :class:`~dinokit.heads.DINOHead` options (hidden/bottleneck widths, layers,
            BatchNorm, weight norm and its gain).
        student_temp: ``tau_s``.
        centering: ``"ema"`` (centre with ``center_momentum``) or ``"sinkhorn"``.
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        weight: the term's weight (1).
    """

    name = "cls"
    consumes = frozenset({GLOBAL_CLS, LOCAL_CLS, TEACHER_GLOBAL})
    cls_only = True

    def __init__(self, n_prototypes: int, head_kwargs: dict[str, Any] | None = None, *,
                 student_temp: float = 0.1, centering: str = "ema", center_momentum: float = 0.9,
                 sinkhorn_iterations: int = 3, weight: float = 1.0):
        super().__init__(weight)
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
        self.n_prototypes, self.head_kwargs = int(n_prototypes), dict(head_kwargs or {})
        self.centering_kind, self.sinkhorn_iterations = centering, int(sinkhorn_iterations)
        # DINOLoss holds tau_s and the EMA centre (kept under this name for checkpoint continuity).
        self.dino_loss = DINOLoss(n_prototypes, student_temp, center_momentum)

    def make_heads(self, embed_dim: int) -> dict[str, nn.Module]:
        return {"head": DINOHead(embed_dim, self.n_prototypes, **self.head_kwargs)}

    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """``[n_global, B, K]`` centred and sharpened teacher distribution."""
        if self.centering_kind == "sinkhorn":
            flat = sinkhorn_knopp(teacher_logits.flatten(0, 1), teacher_temp, self.sinkhorn_iterations)
            return flat.view_as(teacher_logits)
        return self.dino_loss.teacher_probs(teacher_logits, teacher_temp)

    def forward(self, f: StepFeatures, student: nn.ModuleDict, teacher: nn.ModuleDict) -> TermOutput:
        assert f.teacher_global is not None
        n_g, b = f.n_global, f.batch_size
        with torch.no_grad():
            t_logits = teacher["head"](f.teacher_global.cls).view(n_g, b, -1)
        cls = f.student_global.cls if f.student_local_cls is None else torch.cat(
            [f.student_global.cls, f.student_local_cls])
        s_logits = student["head"](cls).view(-1, b, t_logits.shape[-1])
        t_probs = self.teacher_probs(t_logits, f.teacher_temp)
        loss = dino_cross_entropy(s_logits, t_probs, self.dino_loss.student_temp)
        if f.training and self.centering_kind == "ema":
            self.dino_loss.centering.update(t_logits, apply=torch.isfinite(loss))
        diag = teacher_diagnostics(t_probs)
        return TermOutput(loss, {
            "teacher_logits": t_logits.detach(),
            "student_logits": s_logits,
            "teacher_entropy": diag.entropy,
            "teacher_kl_uniform": diag.kl_uniform,
        })
