"""DINO's teacher centring: an EMA centre subtracted from the teacher logits before sharpening.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, Eq. (4):
``c <- m c + (1 - m) mean_i g_t(x_i)``; the teacher distribution is
``softmax((g_t(x) - c) / tau_t)``. Centring stops one prototype dominating; sharpening (a low
``tau_t``) stops the output becoming uniform. The batch mean is this process's mean over its
(valid) rows, averaged over processes: with equal counts per process this is the official DINO /
DINOv2 global mean; for iBOT's masked tokens it is the official ``reduce_center_update`` (per-rank
mean, then averaged). No value is read back to the host.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinokit.distributed import all_reduce_mean


def valid_mean(x: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``x [M, K]`` over the rows where ``valid [M]`` is True (all rows when None), fp32;
    zeros when no row is valid. No boolean indexing (static shapes)."""
    x = x.detach().float()
    if valid is None:
        return x.mean(0)
    if valid.dtype != torch.bool or valid.shape != x.shape[:1]:
        raise ValueError(f"valid must be a BoolTensor [M={x.shape[0]}], got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    total = torch.where(valid[:, None], x, 0.0).sum(0)
    return total / valid.sum().clamp_min(1)


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
        # Deferred mode (a training step owns the update): batch means accumulate here until commit.
        self.register_buffer("pending", torch.zeros(dim), persistent=False)
        self.deferred = False

    def defer_updates(self, deferred: bool = True) -> None:
        """Deferred: :meth:`update` only accumulates the batch mean; :meth:`commit` applies the mean
        of what accumulated, once per optimiser step and only after a finite step (what the
        training step does, so gradient accumulation keeps one centre update per step)."""
        self.deferred = bool(deferred)

    @torch.no_grad()
    def commit(self, n: int = 1, apply: Tensor | None = None) -> None:
        """Apply the mean of the ``n`` batch means accumulated since the last commit; ``apply``
        False (0-dim bool tensor) keeps the old centre. The accumulator is cleared either way."""
        if not self.deferred:
            return
        new = self.center * self.momentum + (self.pending / n) * (1.0 - self.momentum)
        if apply is not None:
            new = torch.where(apply.to(device=new.device, dtype=torch.bool), new, self.center)
        self.center.copy_(new)
        self.pending.zero_()

    def probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher distribution ``softmax((logits - c) / tau_t)`` in fp32, same leading shape."""
        if teacher_temp <= 0:
            raise ValueError(f"teacher temperature must be > 0, got {teacher_temp}")
        return ((teacher_logits.float() - self.center) / teacher_temp).softmax(dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, valid: Tensor | None = None,
               apply: Tensor | None = None) -> None:
        """EMA update with the mean of ``teacher_logits [..., K]`` over this process's (valid)
        samples, averaged over processes.

        Args:
            valid: optional BoolTensor over the flattened leading dims; padded rows are ignored.
            apply: optional 0-dim bool tensor; False keeps the old centre (``torch.where``, on the
                device: a skipped step needs no host sync).
        """
        batch_center = valid_mean(teacher_logits.reshape(-1, teacher_logits.shape[-1]), valid)
        all_reduce_mean(batch_center)
        if self.deferred:  # the step commits it (apply: the step's own finiteness guard)
            self.pending.add_(batch_center)
            return
        new = self.center * self.momentum + batch_center * (1.0 - self.momentum)
        if apply is not None:
            new = torch.where(apply.to(device=new.device, dtype=torch.bool), new, self.center)
        self.center.copy_(new)
