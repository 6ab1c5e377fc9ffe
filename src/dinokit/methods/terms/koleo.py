"""The KoLeo term (Sablayrolles et al. 2019; DINOv2/v3): the KoLeo regulariser of the student's
pre-head CLS features, computed per global crop (never between two crops of one image) and summed
over the global crops, as the official ``koleo_loss_weight * sum(koleo(c) for c in chunks)``."""

from __future__ import annotations

import torch
from torch import nn

from dinokit.losses.koleo import koleo_loss
from dinokit.methods.terms.base import GLOBAL_CLS, LossTerm, StepFeatures, TermOutput, register_term
from dinokit.settings import KoLeoSettings


@register_term
class KoLeoTerm(LossTerm):
    """Args:
        koleo: the term's settings: ``weight`` (DINOv2/v3: 0.1) and ``all_processes`` (search
            nearest neighbours over every process's batch, the gradient flowing back through the
            gather: DINOv3's ``koleo_loss_distributed: true``; the official default, off,
            searches within each process's batch; on, a run with several processes equals one
            process on the global batch).
        reduction: ``"sum"`` over the global crops (official) or ``"mean"``.
    """

    name = "koleo"
    section = "koleo"
    consumes = frozenset({GLOBAL_CLS})
    cls_only = True

    def __init__(self, koleo: KoLeoSettings | None = None, *, reduction: str = "sum"):
        koleo = koleo or KoLeoSettings()
        super().__init__(koleo.weight)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"koleo reduction must be 'sum' or 'mean', got {reduction!r}")
        self.all_processes, self.reduction = bool(koleo.all_processes), reduction

    def forward(self, f: StepFeatures, student: nn.ModuleDict, teacher: nn.ModuleDict) -> TermOutput:
        per_crop = torch.stack([koleo_loss(c, all_processes=self.all_processes)
                                for c in f.student_global.cls.chunk(f.n_global)])
        return TermOutput(per_crop.sum() if self.reduction == "sum" else per_crop.mean())
