"""A plain PyTorch trainer with ``fit`` / ``train_epoch`` / ``validate``, the shape of the educational
implementations people learn DINO from.

For people who prefer to read the whole loop. The step itself is
:class:`~dinokit.train.step.TrainingStep`, the one the Lightning module and the estimator run, so
all three train the same algorithm with the same schedules, clipping, precision and guard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dinokit.settings import StageSettings
from dinokit.train.step import StepSettings, TrainingStep, build_method_optimizer, use_tf32_matmuls


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


@dataclass
class EpochStats:
    """Mean losses of one epoch."""

    epoch: int
    loss: float
    extra: dict[str, float] = field(default_factory=dict)


class DINOTrainer:
    """Train a method module with a readable loop.

    Args:
        method: a DINO/DINOv2/DINOv3 module.
        train_loader: multi-crop batches (dicts from ``MultiCropCollate`` or ``[X]`` lists).
        val_loader: optional held-out multi-crop batches for :meth:`validate`.
        settings: the step's :class:`~dinokit.train.step.StepSettings` (optimiser and schedules,
            precision, accumulation); the defaults are the CLI's, with the method's official
            ``"auto"`` rules.
        stages: the run's stages (:class:`~dinokit.settings.StageSettings`).
        epochs: planned epochs (the schedules span them).
        global_batch: images per optimiser step for the LR scaling rule (default: the loader's
            ``batch_size`` times ``accumulate``).
        log_every_n_steps: how often the non-finite guard is read (one host read each time).
        n_global: global views in list-style batches.
        device: where to train (default: CUDA when available).
    """

    def __init__(
        self,
        method: torch.nn.Module,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        *,
        settings: StepSettings | None = None,
        stages: Sequence[StageSettings] = (),
        epochs: int = 10,
        global_batch: int | None = None,
        log_every_n_steps: int = 50,
        n_global: int = 2,
        device: str | torch.device | None = None,
    ):
        self.settings = settings or StepSettings()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.method = method.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.log_every_n_steps = epochs, max(1, int(log_every_n_steps))
        acc = self.settings.accumulate
        batches = len(train_loader)  # type: ignore[arg-type]
        steps_per_epoch = max(1, math.ceil(batches / acc))
        batch = global_batch or (getattr(train_loader, "batch_size", None) or 1) * acc
        self.optimizer = build_method_optimizer(method, self.settings.optim)
        self.step_fn = TrainingStep(method, self.optimizer, self.settings, stages=stages, n_global=n_global)
        self.step_fn.plan(steps_per_epoch * epochs, steps_per_epoch, batch)
        self.epoch = 0
        self.global_step = 0
        self.history: list[EpochStats] = []

    def train_epoch(self) -> EpochStats:
        """One pass over ``train_loader``, one :class:`~dinokit.train.step.TrainingStep` call per batch."""
        self.method.train()
        total = torch.zeros((), device=self.device)
        n, acc = 0, self.settings.accumulate
        batches = len(self.train_loader)  # type: ignore[arg-type]
        for i, batch in enumerate(self.train_loader):
            result = self.step_fn(_to_device(batch, self.device), step=self.global_step, epoch=self.epoch,
                                  micro=i % acc, last=True if i + 1 == batches else None)
            loss = result.metrics["loss"]
            total += torch.where(torch.isfinite(loss), loss, 0.0)  # type: ignore[arg-type]
            n += 1
            if result.stepped:
                self.global_step += 1
                if self.global_step % self.log_every_n_steps == 0:
                    self.step_fn.check_nonfinite(self.global_step, self.epoch)
                    self.step_fn.check_stage_end(result.output, self.global_step - 1)
        worst = self.step_fn.worst_streak
        # One host read per epoch: the summed loss (skipped steps count as 0) and the guard.
        total_, worst_ = torch.stack([total.float(), torch.zeros_like(total.float()) if worst is None
                                      else worst.to(total.device).float()]).tolist()
        self.step_fn.check_nonfinite(self.global_step, self.epoch, worst=int(worst_))
        loss = total_ / max(n, 1)
        stats = EpochStats(self.epoch, loss)
        self.epoch += 1
        return stats

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss on ``val_loader`` without gradients (centre left untouched)."""
        if self.val_loader is None:
            raise ValueError("validate() needs a val_loader")
        self.method.eval()
        total, n = torch.zeros((), device=self.device), 0
        for batch in self.val_loader:
            total += self.step_fn.forward(_to_device(batch, self.device)).loss
            n += 1
        self.method.train()
        return float(total) / max(n, 1)

    def fit(self) -> list[EpochStats]:
        """Train for the planned epochs; validation loss in ``extra`` when a val loader is set."""
        use_tf32_matmuls()
        while self.epoch < self.epochs:
            stats = self.train_epoch()
            if self.val_loader is not None:
                stats.extra["val_loss"] = self.validate()
            self.history.append(stats)
        return self.history
