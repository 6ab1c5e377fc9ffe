"""Gram anchoring (DINOv3, Siméoni et al. 2025, Sec. 4): keep the patch-to-patch similarity
structure of the student close to that of an earlier "Gram teacher":
``L = mean((P_s P_s^T - P_g P_g^T)^2)`` with ``P`` the (L2-normalised) patch features.

Options as the official ``GramLoss`` (dinov3 ``loss/gram_loss.py``) and its configs:

* ``img_level``: one ``[N, N]`` Gram matrix per image (True) or one ``[B*N, B*N]`` matrix over
  the whole local batch (False).
* ``remove_neg``: negative similarities of both matrices set to 0.
* ``remove_only_teacher_neg``: negative similarities of the teacher set to 0. The official code
  then also zeroes student entries "where both are negative", a condition that can no longer hold
  once the teacher's were zeroed, so the student matrix is left as it is; this is reproduced.
* ``normalize``: L2-normalise the features first.

Defaults follow the published Gram-anchoring run (``dinov3_vit7b16_gram_anchor.yaml``:
``normalized: true, img_level: true, remove_neg: false``); ``GramLoss``'s own constructor
default ``remove_neg=True`` is overridden by every shipped config.

:func:`resample_patch_grid` brings a Gram teacher fed higher-resolution crops to the student's
patch grid as ``ssl_meta_arch.get_gram_teacher_output`` does (``F.interpolate``, bicubic,
``align_corners=False``, no antialias).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def gram_loss(student_patches: Tensor, teacher_patches: Tensor, normalize: bool = True,
              img_level: bool = True, remove_neg: bool = False,
              remove_only_teacher_neg: bool = False) -> Tensor:
    """MSE between the Gram matrices of student and (detached) Gram-teacher patches.

    Args:
        student_patches: ``[B, N, D]``, or ``[M, D]`` selected tokens with ``img_level=False``.
        teacher_patches: same shape as ``student_patches``.
    """
    if student_patches.shape != teacher_patches.shape or student_patches.ndim not in (2, 3):
        raise ValueError(f"student patches {tuple(student_patches.shape)} and Gram-teacher patches "
                         f"{tuple(teacher_patches.shape)} must both be [B, N, D] (or [M, D] with "
                         "img_level=False) of one shape")
    if img_level and student_patches.ndim != 3:
        raise ValueError(f"img_level=True needs [B, N, D] patches, got {tuple(student_patches.shape)}")
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("remove_neg and remove_only_teacher_neg are exclusive; set one of them")
    s, t = student_patches.float(), teacher_patches.detach().float()
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if not img_level and s.ndim == 3:
        s, t = s.flatten(0, 1), t.flatten(0, 1)
    s_sim = s @ s.transpose(-1, -2)
    t_sim = t @ t.transpose(-1, -2)
    if remove_neg or remove_only_teacher_neg:
        t_sim = torch.where(t_sim < 0, 0.0, t_sim)
    if remove_neg:
        s_sim = torch.where(s_sim < 0, 0.0, s_sim)
    return F.mse_loss(s_sim, t_sim)


def resample_patch_grid(patches: Tensor, src_grid: Sequence[int], dst_grid: Sequence[int],
                        mode: str = "bicubic", antialias: bool = False) -> Tensor:
    """``patches [B, h*w, D]`` on the ``src_grid (h, w)`` -> ``[B, h'*w', D]`` on ``dst_grid``:
    the features are resized as an image ``[B, D, h, w]`` (``F.interpolate``,
    ``align_corners=False``), as DINOv3 does for a Gram teacher fed larger crops."""
    (h, w), (h2, w2) = tuple(int(g) for g in src_grid), tuple(int(g) for g in dst_grid)
    if patches.ndim != 3 or patches.shape[1] != h * w:
        raise ValueError(f"patches must be [B, N={h}*{w}, D] for src_grid {(h, w)}, "
                         f"got {tuple(patches.shape)}")
    if (h, w) == (h2, w2):
        return patches
    image = patches.transpose(-2, -1).unflatten(-1, (h, w))  # [B, D, h, w]
    kwargs = {} if mode in ("nearest", "area", "nearest-exact") else {"align_corners": False}
    out = F.interpolate(image, size=(h2, w2), mode=mode, antialias=antialias, **kwargs)
    return out.flatten(-2, -1).transpose(-2, -1)
