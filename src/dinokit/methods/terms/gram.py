"""Gram anchoring (DINOv3, Siméoni et al. 2025, Sec. 4.2): pull the patch-similarity (Gram)
matrix of the student's global-crop patch features towards that of a frozen Gram teacher.

As the official run: the Gram teacher is loaded from the EMA teacher when the Gram stage starts
(``start_step``, the official ``it_load_ema_teacher``) or from a file, then refreshed from the EMA
teacher every ``refresh_every`` steps after ``first_refresh_step`` (at most ``max_refreshes``
times); ``ema_teacher=True`` uses the EMA teacher itself. ``teacher_size`` feeds the Gram teacher
the global crops resized to that size and resamples its patch grid to the student's; a stage's
``gram_teacher_size`` does so within the stage (without either, the Gram teacher sees the global
crops as they are: the larger crops of a high-resolution stage included).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinokit.clock import Stage, TermTiming
from dinokit.losses.gram import gram_loss, resample_patch_grid
from dinokit.methods.terms.base import (
    STUDENT_PATCHES,
    TEACHER_GLOBAL,
    LossTerm,
    StepFeatures,
    TermOutput,
    register_term,
)
from dinokit.settings import GramSettings


@register_term
class GramTerm(LossTerm):
    """Args:
        gram: the term's settings: ``weight`` once ramped up (official ``gram.loss_weight``: 1);
            ``start_step`` (no Gram loss before it; the Gram teacher is taken from the EMA teacher
            there unless loaded from a file); ``ramp_steps`` (the weight ramps linearly over these
            steps; 0 = official); ``refresh_every``, ``first_refresh_step``, ``max_refreshes``
            (the official ``update_frequency`` / ``it_first_update`` / ``max_updates``);
            ``ema_teacher`` (the EMA teacher's own patches, official ``gram.ema_teacher``);
            ``img_level``, ``remove_neg``, ``remove_only_teacher_neg`` (the official loss options);
            ``teacher_size`` (the global crops resized to this size for the Gram teacher).
        normalized: L2-normalise the patch features before the Gram matrices (official: yes).
        resize_mode, resize_antialias: how the Gram teacher's patch grid is resampled to the
            student's.
    """

    name = "gram"
    section = "gram"
    consumes = frozenset({STUDENT_PATCHES, TEACHER_GLOBAL})

    def __init__(self, gram: GramSettings | None = None, *, normalized: bool = True,
                 resize_mode: str = "bicubic", resize_antialias: bool = False):
        gram = gram or GramSettings(weight=1.0)
        super().__init__(gram.weight)
        for name in ("start_step", "ramp_steps", "first_refresh_step"):
            if getattr(gram, name) < 0:
                raise ValueError(f"gram {name} must be >= 0, got {getattr(gram, name)}")
        if gram.refresh_every is not None and gram.refresh_every < 1:
            raise ValueError(f"gram refresh_every must be >= 1, got {gram.refresh_every}")
        if gram.ema_teacher and gram.refresh_every:
            raise ValueError("gram ema_teacher=True uses the EMA teacher itself: refresh_every must be None")
        self.start_step, self.ramp_steps = int(gram.start_step), int(gram.ramp_steps)
        self.refresh_every, self.first_refresh_step = gram.refresh_every, int(gram.first_refresh_step)
        self.max_refreshes, self.ema_teacher = gram.max_refreshes, bool(gram.ema_teacher)
        self.loss_options: dict[str, Any] = dict(img_level=gram.img_level, remove_neg=gram.remove_neg,
                                                 remove_only_teacher_neg=gram.remove_only_teacher_neg,
                                                 normalize=normalized)
        self.teacher_size, self.resize_mode = gram.teacher_size, resize_mode
        self.resize_antialias = resize_antialias
        self.gram_teacher: nn.Module | None = None
        # Saved with the model so that resume knows whether and how often it was loaded.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("n_refreshes", torch.zeros((), dtype=torch.long))
        self._initialized = False  # host mirror of the buffer (no sync per step)

    def timing(self) -> TermTiming:
        return TermTiming(self.weight, self.start_step, self.ramp_steps)

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

    def after_teacher_update(self, step: int, teacher_backbone: nn.Module) -> None:
        """After optimiser step ``step`` (counted from 0): refresh the Gram teacher from the EMA
        teacher when ``step + 1`` is a multiple of ``refresh_every`` and at least
        ``first_refresh_step``, as the official loop's ``(it + 1) % update_frequency == 0``."""
        if self.gram_teacher is None or self.refresh_every is None:
            return
        done = step + 1
        if done < max(self.first_refresh_step, self.start_step) or done % self.refresh_every:
            return
        if self.max_refreshes is not None and int(self.n_refreshes) >= self.max_refreshes:
            return
        self.load_from(teacher_backbone)
        self.n_refreshes += 1

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized = bool(self.initialized)

    # ------------------------------------------------------------------ the loss
    def input_size(self, stage: Stage | None = None) -> int | None:
        """The Gram teacher's input size in ``stage``: the stage's ``gram_teacher_size`` (DINOv3's
        high-resolution stage), else ``teacher_size``; None = the global crops as they are."""
        size = getattr(stage, "gram_teacher_size", None)
        return int(size) if size else self.teacher_size

    @torch.no_grad()
    def _teacher_patches(self, f: StepFeatures, method_teacher_backbone: nn.Module | None) -> Tensor:
        if self.gram_teacher is None:
            assert f.teacher_global is not None
            return f.teacher_global.patches
        images = f.global_images
        student_grid = None
        size = self.input_size(f.stage)
        if size and size != images.shape[-1]:
            student_grid = method_teacher_backbone.grid_size(*images.shape[-2:])
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
        patches = self.gram_teacher(images).patches
        if student_grid is not None:
            grid = self.gram_teacher.grid_size(*images.shape[-2:])
            patches = resample_patch_grid(patches, grid, student_grid, mode=self.resize_mode,
                                          antialias=self.resize_antialias)
        return patches

    def forward(self, f: StepFeatures, student: nn.ModuleDict, teacher: nn.ModuleDict) -> TermOutput:
        if self.gram_teacher is not None and not self._initialized:
            self.load_from(teacher["backbone"])  # the Gram stage starts: take the EMA teacher now
        t_patches = self._teacher_patches(f, teacher["backbone"])
        loss = gram_loss(f.student_global.patches, t_patches, **self.loss_options)
        return TermOutput(loss)
