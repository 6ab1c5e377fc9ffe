"""Memory-lean soft cross-entropies for large prototype counts (K = 65,536 and more).

``-sum_k w_k log_softmax(x / tau)_k`` written out with autograd keeps ``x / tau`` and
``log_softmax`` (two fp32 copies of the logits) and makes two or three more in backward. Here the
forward runs one student view (DINO) or one chunk of rows (iBOT) at a time and keeps only the
per-row log-sum-exp; the backward rebuilds each softmax from the logits and writes the gradient,
``(m softmax(x / tau) - w) / tau`` with ``m = sum_k w_k``, straight into its buffer: besides the
inputs, one ``[rows, K]`` tensor (the gradient itself) at a time. The value equals the autograd
formula up to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _grad_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


class _DINOCrossEntropy(torch.autograd.Function):
    """``sum_{t != s} mean_b H(P_t, softmax(x_s / tau))`` over all (teacher, student) view pairs."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, temp: float) -> Tensor:  # type: ignore[override]
        n_t, n_s = teacher.shape[0], student.shape[0]
        t_sum = teacher.float().sum(0)  # [B, K]
        lse = student.new_empty(student.shape[:2], dtype=torch.float32)
        total = student.new_zeros((), dtype=torch.float32)
        for i in range(n_s):
            z = student[i].float() / temp
            lse[i] = torch.logsumexp(z, dim=-1)
            w = t_sum - teacher[i].float() if i < n_t else t_sum  # a view is never its own target
            total = total + (w * z).sum() - (w.sum(-1) * lse[i]).sum()
        ctx.save_for_backward(student, teacher, lse)
        ctx.temp = temp
        return -total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        student, teacher, lse = ctx.saved_tensors
        temp = ctx.temp
        n_t = teacher.shape[0]
        t_sum = teacher.float().sum(0)
        scale = grad_out.float() / temp
        grad = torch.empty_like(student, dtype=_grad_dtype(student))
        for i in range(student.shape[0]):
            w = t_sum - teacher[i].float() if i < n_t else t_sum
            p = torch.exp(student[i].float() / temp - lse[i].unsqueeze(-1))
            grad[i] = (p * w.sum(-1, keepdim=True) - w) * scale
        return grad, None, None


def dino_pair_cross_entropy_sum(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """``sum_{(t, s), t != s} sum_b H(P_t[b], softmax(x_s[b] / tau_s))`` (memory-lean; the
    teacher side gets no gradient; falls back to autograd when it needs one)."""
    if teacher_probs.requires_grad:
        log_p_s = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
        ce = -torch.einsum("tbk,sbk->ts", teacher_probs.float(), log_p_s)
        return ce.sum() - ce.diagonal().sum()
    return _DINOCrossEntropy.apply(student_logits, teacher_probs, float(student_temp))


class _WeightedRowCrossEntropy(torch.autograd.Function):
    """``sum_u w_u sum_k t_uk (-log_softmax(x_u / tau)_k)``, ``chunk`` rows at a time."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, weights: Tensor, temp: float,  # type: ignore[override]
                chunk: int) -> Tensor:
        lse = student.new_empty(student.shape[:1], dtype=torch.float32)
        total = student.new_zeros((), dtype=torch.float32)
        w_all = weights.float()
        for r0 in range(0, student.shape[0], chunk):
            z = student[r0 : r0 + chunk].float() / temp
            t = teacher[r0 : r0 + chunk].float()
            row_lse = torch.logsumexp(z, dim=-1)
            lse[r0 : r0 + chunk] = row_lse
            ce = (t * (row_lse.unsqueeze(-1) - z)).sum(-1)
            w = w_all[r0 : r0 + chunk]
            total = total + torch.where(w != 0, ce * w, 0.0).sum()  # padding rows add exactly 0
        ctx.save_for_backward(student, teacher, weights, lse)
        ctx.temp, ctx.chunk = temp, chunk
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        student, teacher, weights, lse = ctx.saved_tensors
        temp, chunk = ctx.temp, ctx.chunk
        grad = torch.empty_like(student, dtype=_grad_dtype(student))
        w_all = weights.float() * (grad_out.float() / temp)
        for r0 in range(0, student.shape[0], chunk):
            t = teacher[r0 : r0 + chunk].float()
            p = torch.exp(student[r0 : r0 + chunk].float() / temp - lse[r0 : r0 + chunk].unsqueeze(-1))
            w = w_all[r0 : r0 + chunk].unsqueeze(-1)
            grad[r0 : r0 + chunk] = torch.where(w != 0, (p * t.sum(-1, keepdim=True) - t) * w, 0.0)
        return grad, None, None, None, None


#: elements of one row chunk of :func:`weighted_row_cross_entropy_sum` (64 MB in fp32).
CHUNK_ELEMENTS = 1 << 24


def weighted_row_cross_entropy_sum(student_logits: Tensor, teacher_probs: Tensor, weights: Tensor,
                                   student_temp: float, chunk: int | None = None) -> Tensor:
    """``sum_u weights_u H(t_u, softmax(s_u / tau_s))`` over rows ``u`` of ``[U, K]`` (memory-lean:
    ``chunk`` rows at a time, default :data:`CHUNK_ELEMENTS` / K; rows of weight 0 contribute
    exactly 0; autograd fallback when the teacher needs a gradient)."""
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, student_logits.shape[-1]))
    if teacher_probs.requires_grad or weights.requires_grad:
        log_p_s = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
        ce = -(teacher_probs.float() * log_p_s).sum(-1)
        w = weights.float()
        return torch.where(w != 0, ce * w, 0.0).sum()
    return _WeightedRowCrossEntropy.apply(student_logits, teacher_probs, weights, float(student_temp),
                                          int(chunk))
