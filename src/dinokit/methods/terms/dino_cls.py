"""The DINO CLS term (Caron et al. 2021, Eq. 1-4; DINOv2/v3's ``dino_loss``): cross-entropy between the
teacher's centred, sharpened CLS distribution on each global crop and the student's on every other
crop. Centring is DINO's EMA centre (``"ema"``) or Sinkhorn-Knopp (``"sinkhorn"``, DINOv2/v3)."""

from __future__ import annotations

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
from dinokit.settings import DinoSettings, HeadSettings, TeacherSettings

CENTERINGS = ("ema", "sinkhorn")


@register_term
class DINOClsTerm(LossTerm):
    """Args:
        dino: the term's settings: ``n_prototypes`` of the CLS head (``head`` in the
            student/teacher dicts), ``student_temperature`` and ``weight``.
        heads: the head's architecture (:class:`~dinokit.settings.HeadSettings`, resolved).
        teacher: its centring: ``centering`` (``"ema"`` or ``"sinkhorn"``), ``center_momentum``,
            ``sinkhorn_iterations``.
    """

    name = "cls"
    section = "dino"
    consumes = frozenset({GLOBAL_CLS, LOCAL_CLS, TEACHER_GLOBAL})
    cls_only = True

    def __init__(self, dino: DinoSettings | None = None, heads: HeadSettings | None = None,
                 teacher: TeacherSettings | None = None):
        dino, heads, teacher = dino or DinoSettings(), heads or HeadSettings(), teacher or TeacherSettings()
        super().__init__(dino.weight)
        centering = teacher.centering or "ema"
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        if teacher.sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {teacher.sinkhorn_iterations}")
        self.n_prototypes, self.heads = int(dino.n_prototypes), heads
        self.centering_kind, self.sinkhorn_iterations = centering, int(teacher.sinkhorn_iterations)
        # DINOLoss holds tau_s and the EMA centre (kept under this name for checkpoint continuity).
        self.dino_loss = DINOLoss(dino.n_prototypes, dino.student_temperature, teacher.center_momentum)

    def make_heads(self, embed_dim: int) -> dict[str, nn.Module]:
        return {"head": DINOHead.from_settings(embed_dim, self.n_prototypes, self.heads)}

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
        t_probs = self.teacher_probs(t_logits, f.teacher_temperature)
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
