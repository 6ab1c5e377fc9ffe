"""The Lightning module that trains any dinokit method (DINO, DINOv2, DINOv3).

Lightning supplies the engine (devices, DDP, logging, checkpoints, callbacks); the step itself is
:class:`~dinokit.train.step.TrainingStep`, the same object the plain trainer and the estimator
run (manual optimisation: the module hands Lightning's backward and optimiser step to it).
Metrics are logged as device tensors; the non-finite guard is read only at logging steps, and
when it stops the run it does so at the end of the step (``on_train_batch_end``), once callbacks
have seen the finished step: ``dinokit train`` checkpoints it first
(:class:`~dinokit.train.guards.NonFiniteStopCheckpoint`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from dinokit.train.step import (
    NonFiniteTrainingError,
    OptimizerSpec,
    StepSettings,
    TrainingStep,
    build_method_optimizer,
    method_inputs,
    nonfinite_flag,
    unpack_batch,
    zero_grads_if_,
)

__all__ = ["DINOModule", "NonFiniteTrainingError", "method_inputs", "nonfinite_flag", "unpack_batch",
           "zero_grads_if_"]


class DINOModule(pl.LightningModule):
    """Lightning wrapper around a method module (``self.method``) and its training step.

    Args:
        method: a :class:`~dinokit.methods.base.SelfDistillationMethod` (DINO, DINOv2, DINOv3).
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"``, ``"lars"``, an optimiser class, or a
            callable ``groups -> Optimizer``.
        lr, lr_scaling, lr_reference_batch, lr_schedule, min_lr, warmup_epochs, warmup_start_lr,
        weight_decay, weight_decay_end, clip_grad, clip_mode, freeze_last_layer_epochs,
        freeze_last_layer_mode, max_nonfinite_steps, accumulate, precision: the step's
            :class:`~dinokit.train.step.StepSettings`.
        no_decay_rule, layer_decay, patch_embed_lr_mult, exclude_bias_and_norm_wd, momentum,
            betas, optimizer_kwargs: the optimiser's parameter groups and settings.
        augment: ``data.augment_on=device``: a batched multi-crop run on each batch after it
            reaches the device (seeded from ``seed`` and the step).
        n_global: global views in list-style batches.
        config: the resolved run config (plain dict), stored in checkpoints.
    """

    def __init__(
        self,
        method: torch.nn.Module,
        *,
        optimizer: OptimizerSpec = "adamw",
        lr: float = 0.0005,
        lr_scaling: str = "linear",
        lr_reference_batch: int = 256,
        lr_schedule: str = "warmup_cosine",
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        warmup_start_lr: float = 0.0,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        clip_grad: float = 3.0,
        clip_mode: str = "per_param",
        freeze_last_layer_epochs: float = 1,
        freeze_last_layer_mode: str = "cancel_grad",
        no_decay_rule: str = "dinokit",
        max_nonfinite_steps: int = 3,
        accumulate: int = 1,
        precision: str = "32-true",
        augment: Any = None,
        seed: int = 0,
        layer_decay: float = 1.0,
        patch_embed_lr_mult: float = 1.0,
        exclude_bias_and_norm_wd: bool = True,
        momentum: float = 0.9,
        betas: Sequence[float] = (0.9, 0.999),
        optimizer_kwargs: dict[str, Any] | None = None,
        n_global: int = 2,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False  # the TrainingStep owns backward, clipping and stepping
        self.settings = StepSettings(
            lr=lr, lr_scaling=lr_scaling, lr_reference_batch=lr_reference_batch,
            lr_schedule=lr_schedule, min_lr=min_lr, warmup_epochs=warmup_epochs,
            warmup_start_lr=warmup_start_lr, weight_decay=weight_decay,
            weight_decay_end=weight_decay_end, clip_grad=clip_grad, clip_mode=clip_mode,
            freeze_last_layer_epochs=freeze_last_layer_epochs,
            freeze_last_layer_mode=freeze_last_layer_mode, max_nonfinite_steps=max_nonfinite_steps,
            accumulate=accumulate, precision=precision,
        )
        self.method = method
        method.check_finite = False  # checked at logging steps instead (no per-step host sync)
        self.optimizer_spec = optimizer
        self.no_decay_rule = no_decay_rule
        self.augment, self.seed = augment, int(seed)
        self.layer_decay, self.patch_embed_lr_mult = layer_decay, patch_embed_lr_mult
        self.exclude_bias_and_norm_wd = exclude_bias_and_norm_wd
        self.momentum, self.betas = momentum, tuple(betas)
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.n_global = n_global
        self.run_config = config or {}
        self.step_fn: TrainingStep | None = None
        self._pending_step_state: dict[str, Any] | None = None
        #: the non-finite guard's stop, raised at the end of the step that found it
        self.pending_stop: NonFiniteTrainingError | None = None

    # ------------------------------------------------------------------ setup
    def global_batch_size(self) -> int:
        """Images per optimiser step over all processes."""
        dl = self.trainer.train_dataloader
        per_device = getattr(dl, "batch_size", None) or 1
        return int(per_device) * self.trainer.world_size * self.settings.accumulate

    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch."""
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("the training dataloader must have a length")
        return max(1, math.ceil(batches / self.settings.accumulate))

    def total_steps(self) -> int:
        """Optimiser steps of the whole run (``max_steps`` or ``max_epochs`` epochs, the sooner)."""
        per_epoch = self.steps_per_epoch()
        candidates = []
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            candidates.append(per_epoch * self.trainer.max_epochs)
        if self.trainer.max_steps is not None and self.trainer.max_steps >= 0:
            candidates.append(self.trainer.max_steps)
        if not candidates:
            raise ValueError("set max_epochs or max_steps: the schedules need the run length")
        return max(1, min(candidates))

    def on_train_start(self) -> None:
        opt = self.optimizers()
        self.step_fn = TrainingStep(self.method, getattr(opt, "optimizer", opt), self.settings,
                                    n_global=self.n_global)
        if self._pending_step_state is not None:
            self.step_fn.load_state_dict(self._pending_step_state)
            self._pending_step_state = None
        self.step_fn.plan(self.total_steps(), self.steps_per_epoch(), self.global_batch_size())

    def configure_model(self) -> None:
        """FSDP2 (``trainer.strategy=fsdp``): shard student and teacher on the strategy's mesh,
        before the optimiser is built on the sharded parameters."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or getattr(self.method, "_dinokit_sharded", False):
            return
        from dinokit.train.strategy import shard_method

        shard_method(self.method, mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ())
                     else mesh)
        self.method._dinokit_sharded = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_method_optimizer(
            self.method, self.optimizer_spec, no_decay_rule=self.no_decay_rule,
            exclude_bias_and_norm_wd=self.exclude_bias_and_norm_wd, layer_decay=self.layer_decay,
            patch_embed_lr_mult=self.patch_embed_lr_mult, momentum=self.momentum, betas=self.betas,
            optimizer_kwargs=self.optimizer_kwargs,
        )

    # ------------------------------------------------------------------ step
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.augment is not None and isinstance(batch, dict) and "images" in batch:
            # One CPU generator per step, seeded from the run seed and the step: exact on resume.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
            batch = {**batch, **self.augment(batch["images"], g, sizes=batch.get("sizes"))}
        return batch

    def forward_batch(self, batch: Any) -> Any:
        """Run the method on a batch (dict or list form) under the run's precision."""
        if self.step_fn is not None:
            return self.step_fn.forward(batch)
        return self.method(**method_inputs(unpack_batch(batch, self.n_global)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.step_fn is None:
            raise RuntimeError("DINOModule.training_step runs inside Trainer.fit (on_train_start "
                               "builds the step)")
        opt = self.optimizers()
        micro = batch_idx % self.settings.accumulate
        end = batch_idx + 1 == self.trainer.num_training_batches
        result = self.step_fn(batch, step=self.global_step, epoch=self.current_epoch, micro=micro,
                              last=True if end else None,
                              backward=self.manual_backward, optimizer_step=opt.step)
        self.record_step(result.output)
        metrics = {f"train/{k}": v for k, v in result.metrics.items()}
        self.log("train/loss", metrics.pop("train/loss"), prog_bar=True, batch_size=result.batch_size)
        self.log_dict(metrics, batch_size=result.batch_size)
        if result.stepped and (self.global_step - 1) % self.trainer.log_every_n_steps == 0:
            total = self.step_fn.nonfinite_total
            if total is not None:
                self.log("train/nonfinite_steps", total.float())
            try:
                self.step_fn.check_nonfinite(self.global_step, self.current_epoch)
            except NonFiniteTrainingError as e:
                self.pending_stop = e
        return result.output.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        stop, self.pending_stop = self.pending_stop, None
        if stop is not None:
            raise stop

    def record_step(self, output: Any) -> None:
        """Hook: sees each step's method output (the estimator builds seed 003's dicts from it)."""

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.forward_batch(batch)
        bsz = out.student_logits.shape[1] if getattr(out, "student_logits", None) is not None else None
        self.log("val/loss", out.loss, prog_bar=True, batch_size=bsz, sync_dist=True)
        return out.loss

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        step_state = self.step_fn.state_dict() if self.step_fn is not None else {}
        checkpoint["dinokit"] = {"config": self.run_config, "rng": rng, "format": 1, "step": step_state,
                                 "fsdp": bool(getattr(self.method, "_dinokit_sharded", False))}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("dinokit")
        if not meta:
            return
        self._pending_step_state = meta.get("step") or None
        rng = meta.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "python" in rng:
            random.setstate(_as_random_state(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _as_random_state(state: Any) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
