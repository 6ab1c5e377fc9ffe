"""DINO's teacher centring: an EMA centre subtracted from the teacher logits before sharpening.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, Eq. (4):
``c <- m c + (1 - m) mean_i g_t(x_i)``; the teacher distribution is
``softmax((g_t(x) - c) / tau_t)``. Centring stops one prototype dominating; sharpening (a low
``tau_t``) stops the output becoming uniform. The mean is taken over every process.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinokit.distributed import all_reduce_mean


class EMACenter(nn.Module):
    """The running centre ``c`` of teacher logits, shape ``[K]``.

    Args:
        dim: number of prototypes ``K``.
        momentum: ``m`` in ``c <- m c + (1 - m) mean(logits)`` (DINO: 0.9).
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("center", torch.zeros(dim))

    def probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher distribution ``softmax((logits - c) / tau_t)`` in fp32, same leading shape."""
        if teacher_temp <= 0:
            raise ValueError(f"teacher temperature must be > 0, got {teacher_temp}")
        return ((teacher_logits.float() - self.center) / teacher_temp).softmax(dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """EMA update with the mean of ``teacher_logits [..., K]`` over all samples and processes."""
        batch_center = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]).mean(0)
        all_reduce_mean(batch_center)
        self.center.mul_(self.momentum).add_(batch_center, alpha=1.0 - self.momentum)
