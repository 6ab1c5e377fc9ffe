"""Schedules of DINO training, as plain callables of the step or epoch.

All return Python floats, so applying them in the training step never touches the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then a half-cosine
    from ``base`` to ``final`` that reaches ``final`` exactly at ``total_steps`` and stays there.

    Used per iteration for the learning rate (final ~1e-6), the weight decay (0.04 -> 0.4) and the
    teacher EMA momentum (0.996 -> 1.0), as in DINO's ``cosine_scheduler``.
    """

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (self.base - self.warmup_start) * step / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = 1.0 if span == 0 else min(1.0, (step - self.warmup_steps) / span)
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TeacherTemperature:
    """Teacher temperature per epoch: linear from ``warmup`` to ``final`` over ``warmup_epochs``,
    then constant (DINO: 0.04 -> 0.07 over 30 epochs). Reaches ``final`` at ``warmup_epochs``."""

    warmup: float = 0.04
    final: float = 0.07
    warmup_epochs: int = 30

    def __post_init__(self) -> None:
        if self.warmup <= 0 or self.final <= 0:
            raise ValueError(
                f"teacher temperatures must be > 0, got warmup={self.warmup}, final={self.final}"
            )
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")

    def __call__(self, epoch: float) -> float:
        if self.warmup_epochs == 0 or epoch >= self.warmup_epochs:
            return self.final
        return self.warmup + (self.final - self.warmup) * max(epoch, 0) / self.warmup_epochs


def scaled_lr(base_lr: float, global_batch: int, rule: str = "linear", reference: int = 256) -> float:
    """Learning rate for a global batch size.

    ``linear`` (DINO, Goyal et al. 2017): ``base_lr * batch / reference`` (reference 256);
    ``sqrt`` (DINOv2): ``base_lr * sqrt(batch / reference)`` (DINOv2 uses reference 1024);
    ``none``: ``base_lr``.
    """
    if global_batch < 1:
        raise ValueError(f"global batch size must be >= 1, got {global_batch}")
    if rule == "linear":
        return base_lr * global_batch / reference
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / reference)
    if rule == "none":
        return base_lr
    raise ValueError(f"lr scaling rule must be 'linear', 'sqrt' or 'none', got {rule!r}")


def linear_ramp(step: int, start_step: int, ramp_steps: int, value: float) -> float:
    """0 before ``start_step``, then linearly up to ``value`` over ``ramp_steps`` (e.g. a loss
    weight that starts late in training, like DINOv3's Gram anchoring)."""
    if step < start_step:
        return 0.0
    if ramp_steps <= 0:
        return value
    return value * min(1.0, (step - start_step) / ramp_steps)
