"""Gram anchoring (DINOv3, Siméoni et al. 2025, Sec. 4): keep the patch-to-patch similarity
structure of the student close to that of an earlier "Gram teacher":
``L = mean((P_s P_s^T - P_g P_g^T)^2)`` with ``P`` the L2-normalised patch features ``[B, N, D]``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def gram_loss(student_patches: Tensor, teacher_patches: Tensor, normalize: bool = True) -> Tensor:
    """MSE between the Gram matrices ``[B, N, N]`` of student and (detached) Gram-teacher patches."""
    if student_patches.shape != teacher_patches.shape or student_patches.ndim != 3:
        raise ValueError(f"student patches {tuple(student_patches.shape)} and Gram-teacher patches "
                         f"{tuple(teacher_patches.shape)} must both be [B, N, D] of one shape")
    s, t = student_patches.float(), teacher_patches.detach().float()
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    return (s @ s.transpose(1, 2) - t @ t.transpose(1, 2)).pow(2).mean()
