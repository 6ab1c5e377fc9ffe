"""The DINO self-distillation loss (Caron et al., ICCV 2021, Eq. 1 and 3).

``L = 1/|P| sum_{(t, s) in P} H(P_t, P_s)`` with ``P_s = softmax(g_s / tau_s)``,
``P_t = softmax((g_t - c) / tau_t)`` and ``H(a, b) = -sum_k a_k log b_k``, averaged over the batch.
``P`` holds every (teacher global view, student view) pair except a view with itself: with 2
globals and 8 locals that is 2 * 10 - 2 = 18 pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinokit.losses.centering import EMACenter
from dinokit.losses.lean_ce import dino_pair_cross_entropy_sum


def n_pairs(n_teacher: int, n_student: int) -> int:
    """Number of cross-view pairs: all pairs minus the same-view ones."""
    return n_teacher * n_student - min(n_teacher, n_student)


def dino_cross_entropy(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Mean cross-entropy over cross-view pairs.

    Args:
        student_logits: ``[n_s, B, K]``, global views first, in the teacher's order.
        teacher_probs: ``[n_t, B, K]`` (already centred and sharpened).
        student_temp: ``tau_s``.
    """
    n_t, n_s = teacher_probs.shape[0], student_logits.shape[0]
    pairs = n_pairs(n_t, n_s)
    if pairs == 0:
        raise ValueError(
            f"the DINO loss needs at least two views in total; got {n_t} teacher and {n_s} student"
        )
    # Memory-lean (lean_ce.py): one student view at a time, no fp32 copy of the log-softmax kept
    # for backward; a view is never compared with itself (no boolean indexing, no host sync).
    total = dino_pair_cross_entropy_sum(student_logits, teacher_probs, student_temp)
    return total / (student_logits.shape[1] * pairs)


@dataclass
class TeacherDiagnostics:
    """Collapse indicators of the teacher distribution (detached scalars).

    ``entropy`` near ``ln K`` with ``kl_uniform`` near 0: uniform collapse (every image gets the
    flat distribution). ``entropy`` near 0 with ``kl_uniform`` near ``ln K``: one prototype wins
    for every image. Healthy training sits between: low entropy per image, a spread-out mean.
    """

    entropy: Tensor
    kl_uniform: Tensor


def teacher_diagnostics(teacher_probs: Tensor) -> TeacherDiagnostics:
    """Mean per-sample entropy and KL(mean teacher distribution || uniform), in nats."""
    p = teacher_probs.detach().float().reshape(-1, teacher_probs.shape[-1])
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    mean_p = p.mean(0)
    k = p.shape[-1]
    kl = (mean_p * (torch.log(mean_p.clamp_min(1e-12)) + math.log(k))).sum()
    return TeacherDiagnostics(entropy=entropy, kl_uniform=kl)


def collapse_status(loss: float, entropy: float, kl_uniform: float, n_prototypes: int) -> str:
    """A plain-words reading of the diagnostics, for logs and progress messages."""
    ln_k = math.log(n_prototypes)
    if entropy > 0.95 * ln_k and abs(loss - ln_k) < 0.05 * ln_k:
        return f"uniform collapse: loss and teacher entropy are pinned at ln K = {ln_k:.2f}"
    if kl_uniform > 0.9 * ln_k:
        return "one-prototype collapse: every image is assigned to the same prototype"
    return "ok"


class DINOLoss(nn.Module):
    """Cross-view cross-entropy with EMA centring of the teacher.

    Args:
        out_dim: number of prototypes ``K``.
        student_temp: ``tau_s`` (0.1).
        center_momentum: centre EMA momentum ``m`` (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"temperature_student must be > 0, got {student_temp}")
        self.student_temp = float(student_temp)
        self.centering = EMACenter(out_dim, center_momentum)

    @property
    def center(self) -> Tensor:
        """The current centre ``c``, ``[K]``."""
        return self.centering.center

    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((g_t - c) / tau_t)``, ``[n_t, B, K]``."""
        return self.centering.probs(teacher_logits, teacher_temp)

    def forward(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        """Loss from student logits ``[n_s, B, K]`` and teacher probabilities ``[n_t, B, K]``."""
        if student_logits.ndim != 3 or teacher_probs.ndim != 3:
            raise ValueError(
                "student_logits must be [n_views, B, K] and teacher_probs [n_global, B, K]; got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
            )
        if student_logits.shape[1:] != teacher_probs.shape[1:]:
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and teacher_probs "
                f"{tuple(teacher_probs.shape)} differ in batch size or prototypes"
            )
        return dino_cross_entropy(student_logits, teacher_probs, self.student_temp)

    def update_center(self, teacher_logits: Tensor) -> None:
        """Call after the loss: ``c <- m c + (1 - m) mean(teacher_logits)`` over all processes."""
        self.centering.update(teacher_logits)
