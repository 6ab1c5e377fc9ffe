"""The iBOT masked-patch term (Zhou et al. 2022; DINOv2/v3's ``ibot_patch_loss``): for each masked
patch of a global crop, cross-entropy between the teacher's centred distribution for that patch
(unmasked view) and the student's prediction (masked view), weighted by 1 / (masked patches of its
crop) and summed over all global crops' count, as the official ``forward_masked``.

Masked tokens are gathered with ``index_select`` at ``mask_indices`` (a static upper bound ``U``
of masked tokens; padding rows weigh 0), so the step has fixed shapes and no host sync."""

from __future__ import annotations

import torch
from torch import nn

from dinokit.heads import DINOHead
from dinokit.losses.ibot import IBOTPatchLoss
from dinokit.methods.terms.base import (
    MASKED_PATCHES,
    TEACHER_GLOBAL,
    LossTerm,
    StepFeatures,
    TermOutput,
    register_term,
)
from dinokit.settings import HeadSettings, IBOTSettings, TeacherSettings


@register_term
class IBOTPatchTerm(LossTerm):
    """Args:
        ibot: the term's settings: ``n_prototypes`` of the patch head (``patch_head``; unused with
            ``shared_head``), ``shared_head`` (use the CLS term's ``head`` for patches, as iBOT and
            DINOv2's default config; a separate ``patch_head`` as DINOv2's ViT-L/g configs and
            DINOv3), ``student_temperature`` and ``weight``.
        heads: the head's architecture (resolved).
        teacher: its centring, as the CLS term's.
    """

    name = "patch"
    section = "ibot"
    consumes = frozenset({MASKED_PATCHES, TEACHER_GLOBAL})

    def __init__(self, ibot: IBOTSettings | None = None, heads: HeadSettings | None = None,
                 teacher: TeacherSettings | None = None):
        ibot, heads, teacher = ibot or IBOTSettings(), heads or HeadSettings(), teacher or TeacherSettings()
        super().__init__(ibot.weight)
        self.n_prototypes, self.heads = int(ibot.n_prototypes), heads
        self.shared_head = bool(ibot.shared_head)
        self.head_name = "head" if self.shared_head else "patch_head"
        self.ibot_loss = IBOTPatchLoss(ibot.n_prototypes, ibot.student_temperature,
                                       teacher.centering or "sinkhorn", teacher.center_momentum,
                                       teacher.sinkhorn_iterations)

    def make_heads(self, embed_dim: int) -> dict[str, nn.Module]:
        if self.shared_head:
            return {}
        return {"patch_head": DINOHead.from_settings(embed_dim, self.n_prototypes, self.heads)}

    def forward(self, f: StepFeatures, student: nn.ModuleDict, teacher: nn.ModuleDict) -> TermOutput:
        assert f.teacher_global is not None and f.mask_indices is not None and f.mask_weights is not None
        idx, weights = f.mask_indices, f.mask_weights
        valid = weights > 0
        s_tokens = f.student_global.patches.flatten(0, 1).index_select(0, idx)  # [U, D]
        with torch.no_grad():
            t_tokens = f.teacher_global.patches.flatten(0, 1).index_select(0, idx)
            t_logits = teacher[self.head_name](t_tokens)
            t_probs = self.ibot_loss.teacher_probs(t_logits, f.teacher_temperature, valid=valid)
        s_logits = student[self.head_name](s_tokens)
        n_crops = f.n_global * f.batch_size
        loss = self.ibot_loss(s_logits, t_probs, weights, n_crops)
        if f.training:
            self.ibot_loss.update_center(t_logits, valid=valid, apply=torch.isfinite(loss))
        return TermOutput(loss)
