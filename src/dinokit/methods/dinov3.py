"""DINOv3-style training (Siméoni et al. 2025): DINOv2 with register tokens (4 by default), KoLeo,
and Gram anchoring: the student's patch-similarity (Gram) matrix on the global crops is pulled
towards that of a frozen "Gram teacher", a snapshot of the EMA teacher taken on a schedule or
loaded from a file. Its weight follows a ramp that may start late in training."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dinokit.losses.gram import gram_loss
from dinokit.methods.dinov2 import DINOv2
from dinokit.schedules import linear_ramp


class DINOv3(DINOv2):
    """DINOv3-style method. Arguments as :class:`DINOv2` (``n_register_tokens`` defaults to 4), plus:

    Args:
        gram_weight: weight of Gram anchoring once ramped up (0 = off; then no Gram teacher exists).
        gram_start_step, gram_ramp_steps: the weight is 0 before ``gram_start_step``, then ramps
            linearly to ``gram_weight`` over ``gram_ramp_steps`` optimiser steps.
        gram_refresh_every: copy the EMA teacher into the Gram teacher every N steps (None = only
            at the start, or when :meth:`snapshot_gram_teacher`/:meth:`load_gram_teacher` is called).
    """

    def __init__(self, *args: Any, n_register_tokens: int = 4, gram_weight: float = 0.0,
                 gram_start_step: int = 0, gram_ramp_steps: int = 0, gram_refresh_every: int | None = None,
                 **kwargs: Any):
        super().__init__(*args, n_register_tokens=n_register_tokens, **kwargs)
        if gram_weight < 0 or gram_start_step < 0 or gram_ramp_steps < 0:
            raise ValueError("gram_weight, gram_start_step and gram_ramp_steps must be >= 0")
        if gram_refresh_every is not None and gram_refresh_every < 1:
            raise ValueError(f"gram_refresh_every must be >= 1, got {gram_refresh_every}")
        self.gram_weight, self.gram_start_step = gram_weight, gram_start_step
        self.gram_ramp_steps, self.gram_refresh_every = gram_ramp_steps, gram_refresh_every
        # Outside student (not optimised) and teacher (not EMA-updated); saved for exact resume.
        self.gram_teacher: nn.Module | None = None
        if gram_weight > 0:
            self.snapshot_gram_teacher()

    def snapshot_gram_teacher(self) -> None:
        """Freeze a copy of the current EMA teacher backbone as the Gram teacher."""
        if self.gram_teacher is None:
            self.gram_teacher = copy.deepcopy(self.teacher_backbone)
            for p in self.gram_teacher.parameters():
                p.requires_grad_(False)
        else:
            self.gram_teacher.load_state_dict(self.teacher_backbone.state_dict())

    def load_gram_teacher(self, source: str | Path | dict[str, Tensor]) -> None:
        """Gram teacher weights from a file (export, checkpoint, timm state dict) or a state dict;
        a backbone of another architecture fails with the mismatched keys named."""
        from dinokit.weights import backbone_state_dict, load_backbone_weights, read_file

        if self.gram_teacher is None:
            self.snapshot_gram_teacher()
        state = source if isinstance(source, dict) else backbone_state_dict(read_file(source))
        load_backbone_weights(self.gram_teacher, state, source=str(source if not isinstance(source, dict)
                                                                     else "Gram teacher state dict"))

    def gram_weight_now(self) -> float:
        return linear_ramp(self.step, self.gram_start_step, self.gram_ramp_steps, self.gram_weight)

    def _gram_term(self, s_patches: Tensor, global_images: Tensor) -> tuple[Tensor | None, Tensor | None]:
        w = self.gram_weight_now()
        if self.gram_teacher is None or w == 0.0:
            return None, None
        with torch.no_grad():
            self.gram_teacher.eval()
            g_patches = self.gram_teacher(global_images).patches
        loss = gram_loss(s_patches, g_patches)
        return w * loss, loss.detach()

    @torch.no_grad()
    def update_teacher(self, momentum: float | None = None) -> float:
        m = super().update_teacher(momentum)
        every = self.gram_refresh_every
        if every and self.step % every == 0 and self.gram_teacher is not None:
            self.snapshot_gram_teacher()
        return m
