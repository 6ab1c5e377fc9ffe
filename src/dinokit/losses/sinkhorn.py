"""Sinkhorn-Knopp centring of teacher outputs (SwAV, Caron et al. NeurIPS 2020; DINOv2, Oquab et
al. 2024, Sec. 4): the teacher assignment ``Q [M, K]`` is the doubly-normalised
``exp(logits / T)`` with equal mass per prototype (1/K) and per sample (1/B), found by alternating
row and column normalisations; each sample's row is then rescaled to sum to 1.

As the official ``sinkhorn_knopp_teacher`` (dinov2/dinov3 ``ibot_patch_loss.py``): fp32, the
total mass, the per-prototype sums and ``B`` are summed over all processes. Rows marked invalid
(the padding of a static-size buffer of masked tokens) get zero mass and do not count in ``B``,
so the valid rows get exactly the official result for the unpadded tensor. The logits are shifted
by their (global) maximum before ``exp`` and the row/column sums are floored at 1e-30: the shift
cancels in the first normalisation, and both keep extreme ``logits / T`` finite where the
official code gives inf/nan. No value is read back to the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dinokit.distributed import all_reduce_sum, is_distributed


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                   valid: Tensor | None = None, num_samples: Tensor | int | None = None) -> Tensor:
    """``teacher_logits [M, K]`` -> assignment probabilities ``[M, K]`` (valid rows sum to 1).

    Args:
        teacher_logits: teacher head outputs, ``[M, K]``.
        teacher_temp: ``T`` (> 0).
        n_iterations: alternating normalisations (3 in DINOv2/v3).
        valid: optional BoolTensor ``[M]``; False rows (padding) get probability 0 and are not
            counted in ``B``; their logits may hold any finite or non-finite value.
        num_samples: this process's sample count for ``B`` (default: ``valid.sum()`` or ``M``);
            kept for callers that pass the count themselves.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [M, K], got shape {tuple(teacher_logits.shape)}")
    if teacher_temp <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != teacher_logits.shape[:1]):
        raise ValueError(f"valid must be a BoolTensor [M={teacher_logits.shape[0]}], got "
                         f"{valid.dtype} {tuple(valid.shape)}")
    x = teacher_logits.float() / teacher_temp
    if valid is not None:
        x = torch.where(valid[:, None], x, float("-inf"))
    top = x.amax() if x.numel() else x.new_zeros(())
    if is_distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, 0.0)  # no valid row anywhere: nothing to shift
    q = torch.exp(x - top).t()  # [K, M]; padded columns are exp(-inf) = 0
    k = q.shape[0]
    if num_samples is not None:
        b = torch.as_tensor(num_samples, dtype=torch.float32, device=q.device).clone()
    elif valid is not None:
        b = valid.sum(dtype=torch.float32)
    else:
        b = torch.full((), float(teacher_logits.shape[0]), device=q.device)
    all_reduce_sum(b)
    q = q / all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        rows = all_reduce_sum(q.sum(dim=1, keepdim=True))
        q = q / rows.clamp_min(1e-30) / k
        cols = q.sum(dim=0, keepdim=True).clamp_min(1e-30)  # underflow: a zero row, not 0/0
        if valid is not None:
            cols = torch.where(valid[None, :], cols, 1.0)  # padded columns stay 0, not 0/0
        q = q / cols / b
    return (q * b).t()
