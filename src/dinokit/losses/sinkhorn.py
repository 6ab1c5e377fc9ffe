"""Sinkhorn-Knopp centring of teacher outputs (SwAV, Caron et al. NeurIPS 2020; DINOv2, Oquab et
al. 2024, Sec. 4): the teacher assignment ``Q [M, K]`` is the doubly-normalised
``exp(logits / T)`` with equal mass per prototype (1/K) and per sample (1/B), found by alternating
row and column normalisations; each sample's row is then rescaled to sum to 1. Computed in fp32;
sums and the sample count are reduced over all processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dinokit.distributed import all_reduce_sum, is_distributed


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                   num_samples: Tensor | int | None = None) -> Tensor:
    """``teacher_logits [M, K]`` -> assignment probabilities ``[M, K]`` (rows sum to 1).

    ``num_samples`` is this process's sample count (default ``M``); the total over processes is
    the ``B`` of the column constraint.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [M, K], got shape {tuple(teacher_logits.shape)}")
    if teacher_temp <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    x = teacher_logits.float() / teacher_temp
    top = x.max() if x.numel() else x.new_zeros(())
    if is_distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp(x - top).t()  # [K, M]; the shift cancels in the normalisations
    k = q.shape[0]
    b = torch.as_tensor(teacher_logits.shape[0] if num_samples is None else num_samples,
                        dtype=torch.float32, device=q.device).clone()
    all_reduce_sum(b)
    total = all_reduce_sum(q.sum().clone())
    q = q / total
    for _ in range(n_iterations):
        rows = all_reduce_sum(q.sum(dim=1, keepdim=True).clone())
        q = q / rows.clamp_min(1e-30) / k
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / b
    return (q * b).t()
