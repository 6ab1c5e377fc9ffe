"""A plain PyTorch trainer with ``fit`` / ``train_epoch`` / ``validate`` (the shape of seed 002).

For people who prefer to read the whole loop. It uses the same parts as the Lightning engine
(method hooks, parameter groups, schedules, clipping), so both train the same algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dinokit.schedules import CosineSchedule, scaled_lr
from dinokit.train.module import method_inputs, nonfinite_flag, unpack_batch
from dinokit.train.optim import (
    build_optimizer,
    clip_per_parameter_,
    param_groups,
    set_group_hyperparameters,
    skip_step_if_,
)


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
        epochs: planned epochs (the schedules span them).
        optimizer, lr, min_lr, warmup_epochs, weight_decay, weight_decay_end, clip_grad,
            freeze_last_layer_epochs, lr_scaling: as in :class:`~dinokit.train.DINOModule`.
        device: where to train (default: CUDA when available).
    """

    def __init__(
        self,
        method: torch.nn.Module,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        *,
        epochs: int = 10,
        optimizer: str = "adamw",
        lr: float = 0.0005,
        lr_scaling: str = "linear",
        min_lr: float = 1e-6,
        warmup_epochs: float = 1,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        clip_grad: float = 3.0,
        freeze_last_layer_epochs: int = 1,
        n_global: int = 2,
        device: str | torch.device | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.method = method.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.n_global = epochs, n_global
        self.clip_grad, self.freeze_last_layer_epochs = clip_grad, freeze_last_layer_epochs
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        batch = getattr(train_loader, "batch_size", None) or 1
        total = max(1, steps_per_epoch * epochs)
        peak = scaled_lr(lr, batch, lr_scaling)
        self.lr_schedule = CosineSchedule(peak, min(min_lr, peak), total,
                                          min(int(warmup_epochs * steps_per_epoch), total))
        self.wd_schedule = CosineSchedule(weight_decay, weight_decay_end, total)
        method.set_total_steps(total, steps_per_epoch)
        method.check_finite = False  # one check per epoch below, not a host sync per step
        self.optimizer = build_optimizer(optimizer, param_groups(method.student.named_parameters()))
        self.epoch = 0
        self.global_step = 0
        self.history: list[EpochStats] = []

    def _set_schedules(self) -> None:
        set_group_hyperparameters(self.optimizer, self.lr_schedule(self.global_step),
                                  self.wd_schedule(self.global_step))

    def _forward(self, batch: Any) -> Any:
        b = unpack_batch(_to_device(batch, self.device), self.n_global)
        return self.method(**method_inputs(b))

    def train_epoch(self) -> EpochStats:
        """One pass over ``train_loader``: step, clip, freeze, optimise, move the teacher."""
        self.method.train()
        self.method.set_epoch(self.epoch)
        total = torch.zeros((), device=self.device)
        n = 0
        for batch in self.train_loader:
            self._set_schedules()
            out = self._forward(batch)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.epoch < self.freeze_last_layer_epochs:
                self.method.cancel_last_layer_gradients()
            if self.clip_grad > 0:
                clip_per_parameter_(self.method.student_parameters(), self.clip_grad)
            bad = nonfinite_flag(out.loss, self.method.student_parameters())
            skip_step_if_(self.optimizer, bad)  # a NaN/Inf step changes nothing (decided on the device)
            self.method.update_teacher(apply=~bad)
            self.global_step += 1
            total += out.loss.detach()
            n += 1
        loss = float(total) / max(n, 1)  # one host sync per epoch
        if not math.isfinite(loss):
            raise ValueError(f"training loss became {loss} in epoch {self.epoch}; lower the lr")
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
            total += self._forward(batch).loss
            n += 1
        self.method.train()
        return float(total) / max(n, 1)

    def fit(self) -> list[EpochStats]:
        """Train for the planned epochs; validation loss in ``extra`` when a val loader is set."""
        while self.epoch < self.epochs:
            stats = self.train_epoch()
            if self.val_loader is not None:
                stats.extra["val_loss"] = self.validate()
            self.history.append(stats)
        return self.history
