"""Feature distillation from a frozen teacher backbone: the student's CLS feature and patch
features, each through a small projector to the teacher's width, match the teacher's on the same
global crops. It is the objective for a teacher that comes without heads (a published DINOv2 or
DINOv3 backbone), as in lightly-train's distillation and the feature-matching baselines of
DINOv3's distillation study (Siméoni et al. 2025, Sec. 5).

Per compared pair of vectors ``s`` (student, projected) and ``t`` (teacher):

* ``cosine``: ``1 - cos(s, t)``;
* ``smooth_l1``: ``smooth_l1(s, layer_norm(t); beta)`` summed over the width and averaged over the
  vectors (the teacher is layer-normalised, without affine, so the target has one scale whatever
  the teacher);
* ``cosine+smooth_l1``: their sum.

The loss is ``(w_cls L_cls + w_patch L_patch) / (w_cls + w_patch)``, each ``L`` averaged over the
``[n_global * B]`` CLS vectors and the ``[n_global * B * N]`` patch vectors. The student's patch
grid is resampled to the teacher's by the method before this term (see
:func:`~dinokit.losses.gram.resample_patch_grid`), so ``N`` is the teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinokit.methods.terms.base import (
    GLOBAL_CLS,
    STUDENT_PATCHES,
    TEACHER_GLOBAL,
    LossTerm,
    StepFeatures,
    TermOutput,
    register_term,
)
from dinokit.settings import DistillationSettings

FEATURE_LOSSES = ("cosine", "smooth_l1", "cosine+smooth_l1")


def projector(in_dim: int, out_dim: int, hidden_dim: int = 0) -> nn.Module:
    """Student width -> teacher width: one ``Linear`` (``hidden_dim`` 0) or ``Linear-GELU-Linear``."""
    if hidden_dim <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def feature_loss(student: Tensor, teacher: Tensor, kind: str = "cosine", beta: float = 1.0) -> Tensor:
    """Mean distance of ``student [..., D]`` to ``teacher [..., D]`` over the leading dimensions
    (see the module docstring for ``kind``); computed in fp32."""
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"feature loss must be one of {FEATURE_LOSSES}, got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features "
                         f"{tuple(teacher.shape)} differ in shape")
    s, t = student.float(), teacher.float()
    loss = s.new_zeros(())
    if "cosine" in kind:
        loss = loss + (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if "smooth_l1" in kind:
        target = F.layer_norm(t, t.shape[-1:])
        loss = loss + F.smooth_l1_loss(s, target, beta=beta, reduction="none").sum(-1).mean()
    return loss


@register_term
class FeatureDistillTerm(LossTerm):
    """Args:
        distillation: the term's settings: ``weight``, ``loss`` (cosine, smooth_l1 or both),
            ``cls_weight`` and ``patch_weight`` (0: CLS only, no patch projector),
            ``smooth_l1_beta``, ``projector_hidden_dim``.
        teacher_dim: the teacher's feature width (the projectors' output).
    """

    name = "distill"
    section = "distillation"
    consumes = frozenset({GLOBAL_CLS, STUDENT_PATCHES, TEACHER_GLOBAL})

    def __init__(self, distillation: DistillationSettings | None = None, *, teacher_dim: int):
        d = distillation or DistillationSettings()
        super().__init__(d.weight)
        if d.loss not in FEATURE_LOSSES:
            raise ValueError(f"distillation.loss must be one of {FEATURE_LOSSES}, got {d.loss!r}")
        if d.cls_weight + d.patch_weight <= 0:
            raise ValueError("distillation.cls_weight and patch_weight cannot both be 0")
        self.kind, self.beta = d.loss, float(d.smooth_l1_beta)
        self.cls_weight, self.patch_weight = float(d.cls_weight), float(d.patch_weight)
        self.teacher_dim, self.hidden_dim = int(teacher_dim), int(d.projector_hidden_dim)

    @property
    def uses_patches(self) -> bool:
        return self.patch_weight > 0

    def make_heads(self, embed_dim: int) -> dict[str, nn.Module]:
        heads = {"cls_projector": projector(embed_dim, self.teacher_dim, self.hidden_dim)}
        if self.uses_patches:
            heads["patch_projector"] = projector(embed_dim, self.teacher_dim, self.hidden_dim)
        return heads

    def forward(self, f: StepFeatures, student: nn.ModuleDict, teacher: nn.ModuleDict) -> TermOutput:
        assert f.teacher_global is not None
        s_cls = student["cls_projector"](f.student_global.cls)
        total = self.cls_weight * feature_loss(s_cls, f.teacher_global.cls, self.kind, self.beta)
        outputs: dict[str, Tensor] = {}
        if self.uses_patches:
            s_patches = student["patch_projector"](f.student_global.patches)
            patch = feature_loss(s_patches, f.teacher_global.patches, self.kind, self.beta)
            total = total + self.patch_weight * patch
            outputs["patch_feature_loss"] = patch.detach()
        with torch.no_grad():
            cos = F.cosine_similarity(s_cls.float(), f.teacher_global.cls.float(), dim=-1)
            outputs["cls_cosine"] = cos.mean()
        return TermOutput(total / (self.cls_weight + self.patch_weight), outputs)
