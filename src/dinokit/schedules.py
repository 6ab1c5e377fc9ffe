"""Schedules of DINO training, as plain callables of the step or epoch, with the official end points.

All return Python floats, so applying them in the training step never touches the device.

* :class:`CosineSchedule`: DINO's ``cosine_scheduler`` / DINOv2's and DINOv3's ``CosineScheduler``
  (``np.linspace`` warm-up, then ``cos(pi * i / n)``), and the last-layer freeze of their
  ``last_layer_lr_schedule``.
* :class:`WarmupCosine`: DINOv3's ``linear_warmup_cosine_decay`` (its "schedules v2", used by the
  published DINOv3 configs).
* :class:`TeacherTemperature`: the teacher-temperature warm-up (per epoch in DINO, per iteration
  in DINOv2/v3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def linspace_at(start: float, stop: float, num: int, i: float, endpoint: bool = True) -> float:
    """Element ``i`` of ``np.linspace(start, stop, num, endpoint)`` (same arithmetic: ``i * step +
    start``; the last element of an ``endpoint`` ramp is ``stop`` exactly)."""
    div = (num - 1) if endpoint else num
    if num == 1 or div <= 0:
        return float(start)
    if endpoint and i == num - 1:
        return float(stop)
    step = (stop - start) / div
    if step == 0:
        return float(start)
    return i * step + start


@dataclass(frozen=True)
class CosineSchedule:
    """DINOv2's ``CosineScheduler`` (and DINO's ``cosine_scheduler``), step by step.

    * steps ``0 .. warmup_steps - 1``: ``np.linspace(warmup_start, base, warmup_steps)``, so the
      warm-up reaches ``base`` at step ``warmup_steps - 1``;
    * then ``final + (base - final) (1 + cos(pi * i / n)) / 2`` for ``i = 0 .. n - 1``,
      ``n = total_steps - warmup_steps``;
    * ``final`` at and after ``total_steps``;
    * ``freeze_steps``: the value is 0 for steps ``< freeze_steps`` and the schedule is not shifted
      (DINOv2/DINOv3 ``last_layer_lr_schedule.schedule[:freeze] = 0``, the last-layer freeze).

    Used per iteration for the learning rate, the weight decay (0.04 -> 0.4) and the teacher EMA
    momentum (0.996 -> 1.0).
    """

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0
    freeze_steps: int = 0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}"
            )
        if self.freeze_steps < 0:
            raise ValueError(f"freeze_steps must be >= 0, got {self.freeze_steps}")

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return float(self.final)
        if step < self.freeze_steps:
            return 0.0
        if step < self.warmup_steps:
            return linspace_at(self.warmup_start, self.base, self.warmup_steps, step)
        n = self.total_steps - self.warmup_steps
        i = step - self.warmup_steps
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * i / n))


@dataclass(frozen=True)
class WarmupCosine:
    """DINOv3's ``linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine)``:
    ``np.linspace(start, peak, warmup, endpoint=False)`` (reaches ``peak`` at step ``warmup``),
    then ``end + (peak - end) (1 + cos(pi * i / (c - 1))) / 2`` for ``i = 0 .. c - 1``
    (reaches ``end`` at its last step), then ``end``. ``cosine_steps`` defaults to the rest."""

    start: float
    peak: float
    end: float
    warmup_steps: int
    total_steps: int
    cosine_steps: int | None = None

    def __post_init__(self) -> None:
        cos = self.total_steps - self.warmup_steps if self.cosine_steps is None else self.cosine_steps
        if self.warmup_steps < 0 or cos < 0 or self.warmup_steps + cos > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) + cosine_steps ({cos}) must fit in "
                             f"total_steps ({self.total_steps}), all >= 0")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return linspace_at(self.start, self.peak, self.warmup_steps, step, endpoint=False)
        c = self.total_steps - self.warmup_steps if self.cosine_steps is None else self.cosine_steps
        i = step - self.warmup_steps
        if i >= c:
            return float(self.end)
        angle = linspace_at(0.0, math.pi, c, i)
        return (self.peak - self.end) * ((math.cos(angle) + 1) / 2) + self.end


class TeacherTemperature:
    """Teacher temperature: ``np.linspace(warmup, final, warmup_length)`` then ``final``.

    Call it with an index in the caller's unit: the epoch in DINO (0.04 -> 0.07 over 30 epochs),
    the iteration in DINOv2/v3 (over ``warmup_epochs * epoch_length`` iterations). With
    ``endpoint=True`` (DINO, DINOv2) ``final`` is reached at ``warmup_length - 1``; with
    ``endpoint=False`` (DINOv3's ``linear_warmup_cosine_decay``) at ``warmup_length``.

    ``warmup_epochs`` is the older name of ``warmup_length``.
    """

    def __init__(self, warmup: float = 0.04, final: float = 0.07, warmup_length: float | None = None,
                 *, warmup_epochs: float | None = None, endpoint: bool = True):
        if warmup_length is not None and warmup_epochs is not None:
            raise TypeError("give warmup_length or its older name warmup_epochs, not both")
        length = warmup_length if warmup_length is not None else warmup_epochs
        length = 30 if length is None else length
        if warmup <= 0 or final <= 0:
            raise ValueError(f"teacher temperatures must be > 0, got warmup={warmup}, final={final}")
        if length < 0:
            raise ValueError(f"warmup_length must be >= 0, got {length}")
        self.warmup, self.final = float(warmup), float(final)
        self.warmup_length, self.endpoint = length, bool(endpoint)

    @property
    def warmup_epochs(self) -> float:
        """Older name of ``warmup_length``."""
        return self.warmup_length

    def __call__(self, index: float) -> float:
        length = self.warmup_length
        if length == 0 or index >= length:
            return self.final
        return linspace_at(self.warmup, self.final, length, max(index, 0), endpoint=self.endpoint)

    def __repr__(self) -> str:
        return (f"TeacherTemperature(warmup={self.warmup}, final={self.final}, "
                f"warmup_length={self.warmup_length}, endpoint={self.endpoint})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TeacherTemperature) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


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
