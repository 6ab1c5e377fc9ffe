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
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from dinokit.settings import StageSettings
from dinokit.train.step import (
    NonFiniteTrainingError,
    OptimizerSpec,
    StepSettings,
    TrainingStep,
    build_method_optimizer,
    method_inputs,
    nonfinite_flag,
    unpack_batch,
    use_tf32_matmuls,
    zero_grads_if_,
)
from dinokit.weights import WeightsError

__all__ = ["DINOModule", "NonFiniteTrainingError", "method_inputs", "nonfinite_flag", "unpack_batch",
           "zero_grads_if_"]


class DINOModule(pl.LightningModule):
    """Lightning wrapper around a method module (``self.method``) and its training step.

    Args:
        method: a :class:`~dinokit.methods.base.SelfDistillationMethod` (DINO, DINOv2, DINOv3).
        settings: the step's :class:`~dinokit.train.step.StepSettings` (optimiser and schedules,
            precision, accumulation, the non-finite guard); its ``"auto"`` rules are the method's
            official ones.
        stages: the run's stages (:class:`~dinokit.settings.StageSettings`).
        stage_lengths: realised stage lengths known before the run (a skipped head warm-up: 0;
            see :class:`~dinokit.train.step.TrainingStep`).
        optimizer: replaces ``settings.optim.optimizer``: an optimiser class or a callable
            ``groups -> Optimizer`` (the estimator's choices).
        optimizer_kwargs, exclude_bias_and_norm_wd: passed to
            :func:`~dinokit.train.step.build_method_optimizer`.
        lr_interval: ``"step"`` or ``"epoch"`` (see :class:`~dinokit.train.step.TrainingStep`).
        augment: ``data.augment_on=device``: a batched multi-crop run on each batch after it
            reaches the device (seeded from ``seed`` and the step).
        seed: the run's seed.
        n_global: global views in list-style batches.
        config: the resolved run config (plain dict), stored in checkpoints.
    """

    def __init__(
        self,
        method: torch.nn.Module,
        settings: StepSettings | None = None,
        *,
        stages: Sequence[StageSettings] = (),
        stage_lengths: Mapping[int, int] | None = None,
        optimizer: OptimizerSpec | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        exclude_bias_and_norm_wd: bool = True,
        lr_interval: str = "step",
        augment: Any = None,
        seed: int = 0,
        n_global: int = 2,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False  # the TrainingStep owns backward, clipping and stepping
        self.settings = settings or StepSettings()
        self.method = method
        self.stages = list(stages)
        self.stage_lengths = dict(stage_lengths or {})
        self.optimizer_spec, self.optimizer_kwargs = optimizer, dict(optimizer_kwargs or {})
        self.exclude_bias_and_norm_wd, self.lr_interval = exclude_bias_and_norm_wd, lr_interval
        self.augment, self.seed = augment, int(seed)
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
        use_tf32_matmuls()
        opt = self.optimizers()
        self.step_fn = TrainingStep(self.method, getattr(opt, "optimizer", opt), self.settings,
                                    stages=self.stages, n_global=self.n_global, lr_interval=self.lr_interval,
                                    stage_lengths=self.stage_lengths)
        if self._pending_step_state is not None:
            self.step_fn.load_state_dict(self._pending_step_state)
            self._pending_step_state = None
        self.step_fn.plan(self.total_steps(), self.steps_per_epoch(), self.global_batch_size())

    def configure_model(self) -> None:
        """FSDP2 (``trainer.strategy=fsdp``): shard student and teacher on the strategy's mesh,
        before the optimiser is built on the sharded parameters."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or is_sharded(self.method):
            return
        from dinokit.train.strategy import shard_method

        shard_method(self.method, mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ())
                     else mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_method_optimizer(self.method, self.settings.optim, self.optimizer_spec,
                                      exclude_bias_and_norm_wd=self.exclude_bias_and_norm_wd,
                                      optimizer_kwargs=self.optimizer_kwargs)

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
            self.step_fn.check_stage_end(result.output, self.global_step - 1)
        return result.output.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        stop, self.pending_stop = self.pending_stop, None
        if stop is not None:
            raise stop

    def record_step(self, output: Any) -> None:
        """Hook: sees each step's method output (the estimator builds its per-step dicts from it)."""

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
                                 "fsdp": is_sharded(self.method)}
        external = left_out_networks(self.method)
        if external:  # a distillation's frozen teacher: its fingerprint, not its weights
            state = checkpoint.get("state_dict") or {}
            prefixes = tuple(f"method.{name}." for name in external)
            for k in [k for k in state if k.startswith(prefixes)]:
                del state[k]
            checkpoint["dinokit"]["external"] = external

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("dinokit")
        if not meta:
            return
        self._pending_step_state = meta.get("step") or None
        recorded = meta.get("external") or {}
        problem = external_mismatch(self.method, recorded)
        if problem:
            raise WeightsError(problem)
        state = checkpoint.get("state_dict")  # absent under FSDP2, whose strategy loaded it already
        if recorded and isinstance(state, dict):  # the networks left out: as this run rebuilt them
            for name in recorded:
                for k, v in getattr(self.method, name).state_dict().items():
                    state.setdefault(f"method.{name}.{k}", v)
        rng = meta.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "python" in rng:
            random.setstate(_as_random_state(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def left_out_networks(method: torch.nn.Module) -> dict[str, str]:
    """The method's external networks that its training checkpoints leave out, with their
    fingerprints (see :meth:`~dinokit.methods.base.SelfDistillationMethod.external_networks`)."""
    if getattr(method, "checkpoint_external", True):
        return {}
    return dict(method.external_networks())


def external_mismatch(method: torch.nn.Module, recorded: Mapping[str, str]) -> str | None:
    """Why a checkpoint that left networks out (``recorded``: name -> fingerprint) cannot resume
    ``method``, in one line; None when every network was rebuilt with the same weights."""
    have = method.external_networks() if hasattr(method, "external_networks") else {}
    for name, fp in recorded.items():
        if name not in have:
            return (f"the checkpoint was written without its {name} (a distillation's frozen teacher), "
                    "which this run does not rebuild: resume it with its own config")
        if have[name] != fp:
            return (f"model.teacher: not the teacher this run was trained with (the checkpoint records "
                    f"weights with fingerprint {fp[:12]}, model.teacher gives {have[name][:12]}); give the "
                    "same teacher file, unchanged")
    return None


def check_external_networks(ckpt: Any, method: torch.nn.Module) -> None:
    """Fail on one line, before training, when the networks a checkpoint left out are not
    rebuilt with the weights it records (see :func:`external_mismatch`)."""
    obj = torch.load(str(ckpt), map_location="cpu", weights_only=True, mmap=True)
    problem = external_mismatch(method, (obj.get("dinokit") or {}).get("external") or {})
    if problem:
        raise WeightsError(f"trainer.resume: {problem}")


def is_sharded(method: torch.nn.Module) -> bool:
    """Whether FSDP2 sharded the method (its parameters are DTensors)."""
    return any(hasattr(p, "full_tensor") for p in method.parameters())


def _as_random_state(state: Any) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
