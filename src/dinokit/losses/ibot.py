"""iBOT masked-patch loss (Zhou et al., ICLR 2022; DINOv2, Oquab et al. 2024, Sec. 4):

``L = 1/|I_m| sum_{i in I_m} 1/n_i sum_{p masked in i} H(P_t(p), P_s(p))``: cross-entropy between
the teacher's patch assignment (unmasked view) and the student's prediction for the same patch of
the masked view, over masked tokens only; each token weighted by 1 / (masked tokens in its image)
and the sum divided by the number of images with at least one masked token."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinokit.losses.centering import EMACenter
from dinokit.losses.sinkhorn import sinkhorn_knopp


def ibot_patch_loss(student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks: Tensor,
                    student_temp: float = 0.1) -> Tensor:
    """Args: ``student_patch_logits [M, K]`` and ``teacher_patch_probs [M, K]`` of the masked tokens
    in the order of ``masks.nonzero()``; ``masks [n_images, N]`` bool. Returns a scalar."""
    if student_patch_logits.shape != teacher_patch_probs.shape:
        raise ValueError(f"student {tuple(student_patch_logits.shape)} and teacher "
                         f"{tuple(teacher_patch_probs.shape)} patch outputs differ")
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool [n_images, N] tensor, got {masks.dtype} {tuple(masks.shape)}")
    counts = masks.sum(dim=1)  # masked tokens per image
    weights = (1.0 / counts.clamp_min(1).float()).unsqueeze(1).expand_as(masks)[masks]  # [M]
    log_p_s = torch.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
    ce = -(teacher_patch_probs.float() * log_p_s).sum(-1)
    n_images = (counts > 0).sum().clamp_min(1)
    return (ce * weights).sum() / n_images


class IBOTPatchLoss(nn.Module):
    """iBOT loss with its teacher centring: ``"sinkhorn"`` (DINOv2) or ``"ema"`` (iBOT's centre)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, centering: str = "sinkhorn",
                 center_momentum: float = 0.9, sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in ("sinkhorn", "ema"):
            raise ValueError(f"centering must be 'sinkhorn' or 'ema', got {centering!r}")
        self.student_temp, self.centering_kind = student_temp, centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.center = EMACenter(out_dim, center_momentum) if centering == "ema" else None

    def teacher_probs(self, teacher_patch_logits: Tensor, teacher_temp: float) -> Tensor:
        if self.center is None:
            return sinkhorn_knopp(teacher_patch_logits, teacher_temp, self.sinkhorn_iterations)
        return self.center.probs(teacher_patch_logits, teacher_temp)

    def update_center(self, teacher_patch_logits: Tensor) -> None:
        if self.center is not None:
            self.center.update(teacher_patch_logits)

    def forward(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks: Tensor) -> Tensor:
        return ibot_patch_loss(student_patch_logits, teacher_patch_probs, masks, self.student_temp)
