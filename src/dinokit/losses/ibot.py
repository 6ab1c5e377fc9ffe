"""iBOT masked-patch loss (Zhou et al., ICLR 2022; DINOv2, Oquab et al. 2024, Sec. 4):

``L = -1/n_crops sum_u w_u sum_k P_t(u)_k log P_s(u)_k`` over the masked tokens ``u``, with
``w_u = 1 / (masked tokens in u's crop)`` and ``n_crops`` the number of ALL global crops
(``n_global * B``), masked or not: the official ``forward_masked`` divides by
``student_masks_flat.shape[0]`` (dinov2 ``loss/ibot_patch_loss.py``; dinov3 ``compute_losses``).
``P_t`` is the teacher's assignment of the patch in the unmasked view (Sinkhorn-Knopp in DINOv2/v3,
or iBOT's EMA-centred softmax), ``P_s = softmax(s / tau_s)`` the student's prediction for the
same patch of the masked view.

The tokens come as a static-size buffer ``[U, K]`` (``U`` an upper bound of the masked count that
depends only on the batch geometry, as DINOv2's ``upperbound``); padded rows carry weight 0 and
contribute exactly 0. Nothing here reads a value back to the host or indexes with a boolean mask,
so the loss runs in a sync-free, compiled training step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinokit.losses.centering import EMACenter
from dinokit.losses.lean_ce import weighted_row_cross_entropy_sum
from dinokit.losses.sinkhorn import sinkhorn_knopp


def masked_token_weights(masks: Tensor) -> Tensor:
    """``1 / (masked count of the crop)`` for each masked token of ``masks [n_crops, N]`` in the
    order of ``masks.flatten().nonzero()`` (the official ``masks_weight``). Boolean indexing: for
    the collate or tests, not for the training step."""
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool [n_crops, N] tensor, got {masks.dtype} {tuple(masks.shape)}")
    counts = masks.sum(-1, keepdim=True).clamp_min(1).float()
    return (1.0 / counts).expand_as(masks)[masks]


def ibot_patch_loss(student_patch_logits: Tensor, teacher_patch_probs: Tensor, weights: Tensor,
                    n_crops: int | Tensor, student_temp: float = 0.1) -> Tensor:
    """``-sum_u weights_u sum_k t_uk log_softmax(s_u / tau_s)_k / n_crops`` (a scalar).

    Args:
        student_patch_logits: ``[U, K]`` student head outputs of the masked tokens (padded rows:
            any finite values).
        teacher_patch_probs: ``[U, K]`` teacher probabilities of the same tokens.
        weights: ``[U]`` per-token weights, ``1 / masked count of the token's crop``; 0 = padding.
        n_crops: number of global crops ``n_global * B`` (all of them, masked or not).
        student_temp: ``tau_s`` (0.1).
    """
    if student_patch_logits.shape != teacher_patch_probs.shape or student_patch_logits.ndim != 2:
        raise ValueError(f"student {tuple(student_patch_logits.shape)} and teacher "
                         f"{tuple(teacher_patch_probs.shape)} patch outputs must both be [U, K]")
    if weights.shape != student_patch_logits.shape[:1]:
        raise ValueError(f"weights must be [U={student_patch_logits.shape[0]}], got {tuple(weights.shape)}")
    if isinstance(n_crops, int) and n_crops < 1:
        raise ValueError(f"n_crops (all global crops, n_global * B) must be >= 1, got {n_crops}")
    # memory-lean (lean_ce.py): chunks of rows, no fp32 log-softmax copy kept; padding adds exactly 0
    return weighted_row_cross_entropy_sum(student_patch_logits, teacher_patch_probs, weights,
                                          student_temp) / n_crops


class IBOTPatchLoss(nn.Module):
    """iBOT loss with its teacher centring: ``"sinkhorn"`` (DINOv2/v3) or ``"ema"`` (iBOT's and
    DINOv2's ``softmax_center_teacher``: an EMA centre of the masked teacher tokens)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, centering: str = "sinkhorn",
                 center_momentum: float = 0.9, sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in ("sinkhorn", "ema"):
            raise ValueError(f"centering must be 'sinkhorn' or 'ema', got {centering!r}")
        self.student_temp, self.centering_kind = student_temp, centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.center = EMACenter(out_dim, center_momentum) if centering == "ema" else None

    def teacher_probs(self, teacher_patch_logits: Tensor, teacher_temp: float,
                      valid: Tensor | None = None) -> Tensor:
        """``[U, K]`` teacher probabilities; rows where ``valid [U]`` is False are 0."""
        if self.center is None:
            return sinkhorn_knopp(teacher_patch_logits, teacher_temp, self.sinkhorn_iterations, valid=valid)
        probs = self.center.probs(teacher_patch_logits, teacher_temp)
        return probs if valid is None else torch.where(valid[:, None], probs, 0.0)

    def update_center(self, teacher_patch_logits: Tensor, valid: Tensor | None = None,
                      apply: Tensor | None = None) -> None:
        """EMA centre over the valid rows (no-op with Sinkhorn-Knopp); ``apply``: see
        :meth:`EMACenter.update`."""
        if self.center is not None:
            self.center.update(teacher_patch_logits, valid=valid, apply=apply)

    def forward(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, weights: Tensor,
                n_crops: int | Tensor | None = None) -> Tensor:
        """:func:`ibot_patch_loss`. Also accepts ``(s, t, masks [n_crops, N] bool)`` with
        the tokens in ``masks.nonzero()`` order (weights derived, ``n_crops = masks.shape[0]``)."""
        if n_crops is None:
            if weights.ndim != 2 or weights.dtype != torch.bool:
                raise ValueError("n_crops (all global crops) is required with per-token weights")
            weights, n_crops = masked_token_weights(weights), weights.shape[0]
        return ibot_patch_loss(student_patch_logits, teacher_patch_probs, weights, n_crops,
                               self.student_temp)
