"""Gram anchoring (DINOv3, Siméoni et al. 2025, Sec. 4.2): pull the patch-similarity (Gram)
matrix of the student's global-crop patch features towards that of a frozen Gram teacher.

As the official run: the Gram teacher is loaded from the EMA teacher when the Gram stage starts
(``start_step``, the official ``it_load_ema_teacher``) or from a file, then refreshed from the EMA
teacher every ``refresh_every`` steps after ``first_refresh_step`` (at most ``max_refreshes``
times); ``ema_teacher=True`` uses the EMA teacher itself. ``teacher_size`` feeds the Gram teacher
the global crops resized to that size and resamples its patch grid to the student's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinokit.losses.gram import gram_loss, resample_patch_grid
from dinokit.methods.terms.base import (
    STUDENT_PATCHES,
    TEACHER_GLOBAL,
    LossTerm,
    StepFeatures,
    TermOutput,
    register_term,
)
from dinokit.schedules import linear_ramp


@register_term
class GramTerm(LossTerm):
    """Args:
        weight: the loss weight once ramped up (official ``gram.loss_weight``: 1).
        start_step: no Gram loss before this step; the Gram teacher is taken from the EMA
            teacher here unless loaded from a file.
        ramp_steps: the weight ramps linearly over these steps after ``start_step`` (0 = none,
            official).
        refresh_every: refresh the Gram teacher from the EMA teacher every N steps (None = never).
        first_refresh_step, max_refreshes: the official ``it_first_update`` / ``max_updates``.
        ema_teacher: use the EMA teacher's own patches (official ``gram.ema_teacher``).
        img_level, remove_neg, remove_only_teacher_neg, normalized: the official loss options.
        teacher_size: resize the global crops to this size for the Gram teacher (None = as is).
        resize_mode, resize_antialias: how its patch grid is resampled to the student's.
    """

    name = "gram"
    consumes = frozenset({STUDENT_PATCHES, TEACHER_GLOBAL})

    def __init__(self, weight: float = 1.0, *, start_step: int = 0, ramp_steps: int = 0,
                 refresh_every: int | None = None, first_refresh_step: int = 0,
                 max_refreshes: int | None = None, ema_teacher: bool = False, img_level: bool = False,
                 remove_neg: bool = False, remove_only_teacher_neg: bool = False, normalized: bool = True,
                 teacher_size: int | None = None, resize_mode: str = "bicubic",
                 resize_antialias: bool = False):
        super().__init__(weight)
        for name, v in (("start_step", start_step), ("ramp_steps", ramp_steps),
                        ("first_refresh_step", first_refresh_step)):
            if v < 0:
                raise ValueError(f"gram {name} must be >= 0, got {v}")
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(f"gram refresh_every must be >= 1, got {refresh_every}")
        if ema_teacher and refresh_every:
            raise ValueError("gram ema_teacher=True uses the EMA teacher itself: refresh_every must be None")
        self.start_step, self.ramp_steps = int(start_step), int(ramp_steps)
        self.refresh_every, self.first_refresh_step = refresh_every, int(first_refresh_step)
        self.max_refreshes, self.ema_teacher = max_refreshes, bool(ema_teacher)
        self.loss_options: dict[str, Any] = dict(img_level=img_level, remove_neg=remove_neg,
                                                 remove_only_teacher_neg=remove_only_teacher_neg,
                                                 normalize=normalized)
        self.teacher_size, self.resize_mode = teacher_size, resize_mode
        self.resize_antialias = resize_antialias
        self.gram_teacher: nn.Module | None = None
        # Saved with the model so that resume knows whether and how often it was loaded.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("n_refreshes", torch.zeros((), dtype=torch.long))
        self._initialized = False  # host mirror of the buffer (no sync per step)

    def weight_at(self, step: int) -> float:
        return linear_ramp(step, self.start_step, self.ramp_steps, self.weight)

    # ------------------------------------------------------------------ the Gram teacher
    def bind(self, teacher_backbone: nn.Module) -> None:
        """Create the (frozen, not yet loaded) Gram teacher with the teacher's architecture."""
        if self.ema_teacher:
            return
        self.gram_teacher = copy.deepcopy(teacher_backbone)
        self.gram_teacher.requires_grad_(False)
        self.gram_teacher.eval()

    def train(self, mode: bool = True) -> GramTerm:
        """The Gram teacher is a frozen snapshot: it stays in eval mode whatever the method's mode."""
        super().train(mode)
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @torch.no_grad()
    def load_from(self, backbone: nn.Module | dict[str, Tensor]) -> None:
        """Load the Gram teacher from a backbone (the EMA teacher) or a state dict."""
        if self.gram_teacher is None:
            raise ValueError("this Gram term uses the EMA teacher directly (ema_teacher=True)")
        state = backbone if isinstance(backbone, dict) else backbone.state_dict()
        self.gram_teacher.load_state_dict(state)
        self.initialized.fill_(True)
        self._initialized = True

    def on_teacher_update(self, method: nn.Module) -> None:
        if self.gram_teacher is None or self.refresh_every is None:
            return
        step = method.step
        if step < max(self.first_refresh_step, self.start_step) or step % self.refresh_every:
            return
        if self.max_refreshes is not None and int(self.n_refreshes) >= self.max_refreshes:
            return
        self.load_from(method.teacher_backbone)
        self.n_refreshes += 1

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized = bool(self.initialized)

    # ------------------------------------------------------------------ the loss
    @torch.no_grad()
    def _teacher_patches(self, f: StepFeatures, method_teacher_backbone: nn.Module | None) -> Tensor:
        if self.gram_teacher is None:
            assert f.teacher_global is not None
            return f.teacher_global.patches
        images = f.global_images
        student_grid = None
        if self.teacher_size and self.teacher_size != images.shape[-1]:
            student_grid = method_teacher_backbone.grid_size(*images.shape[-2:])
            images = F.interpolate(images, size=(self.teacher_size, self.teacher_size), mode="bicubic",
                                   align_corners=False)
        patches = self.gram_teacher(images).patches
        if student_grid is not None:
            grid = self.gram_teacher.grid_size(*images.shape[-2:])
            patches = resample_patch_grid(patches, grid, student_grid, mode=self.resize_mode,
                                          antialias=self.resize_antialias)
        return patches

    def forward(self, f: StepFeatures, student: nn.ModuleDict, teacher: nn.ModuleDict) -> TermOutput:
        if self.gram_teacher is not None and not self._initialized:
            if f.step < self.start_step:  # weight 0 here; the method skips the term
                return TermOutput(f.student_global.patches.sum() * 0.0)
            self.load_from(teacher["backbone"])  # the Gram stage starts: take the EMA teacher now
        t_patches = self._teacher_patches(f, teacher["backbone"])
        loss = gram_loss(f.student_global.patches, t_patches, **self.loss_options)
        return TermOutput(loss)
