"""The Lightning module that trains any dinokit method (DINO, DINOv2, DINOv3).

Per optimiser step, from Python floats only (no host-device synchronisation):
learning rate (linear warm-up + cosine, linear scaling rule) and weight decay (cosine) set on
every parameter group; DINO's per-parameter gradient clipping (or a global norm); prototypes
frozen during the first epochs; the EMA teacher moved after the step; the teacher temperature
set per epoch. The loss is checked for NaN/inf only at logging steps, where Lightning reads it
anyway.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from dinokit.schedules import CosineSchedule, scaled_lr
from dinokit.train.optim import (
    build_optimizer,
    clip_per_module_,
    clip_per_parameter_,
    is_fused,
    param_groups,
    set_group_hyperparameters,
)

OptimizerSpec = str | type | Callable[..., torch.optim.Optimizer]
CLIP_MODES = ("per_param", "per_module", "global", "none")


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""

    exit_code = 3


@torch.no_grad()
def nonfinite_flag(loss: Tensor | None, params: Sequence[Tensor]) -> Tensor:
    """0-dim bool tensor: the loss or any gradient is NaN/Inf (decided on the device)."""
    grads = [p.grad for p in params if p.grad is not None]
    flags = [] if loss is None else [~torch.isfinite(loss.detach()).all()]
    if grads:
        norms = torch._foreach_norm(grads)
        flags.append(~torch.isfinite(torch.stack([n.float() for n in norms])).all())
    if not flags:
        return torch.zeros((), dtype=torch.bool)
    return torch.stack(flags).any()


@torch.no_grad()
def zero_grads_if_(params: Sequence[Tensor], flag: Tensor) -> None:
    """Replace every gradient by zeros when ``flag`` is True, without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        keep = (~flag).to(grads[0].dtype)
        torch._foreach_mul_([g.nan_to_num_(0.0, 0.0, 0.0) for g in grads], keep)
BATCH_INPUTS = ("masks", "mask_indices", "mask_weights")


def method_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The method's keyword arguments from an unpacked batch (views, and masks when present)."""
    kwargs: dict[str, Any] = {"global_views": batch["global_views"], "local_views": batch["local_views"]}
    kwargs.update({k: batch[k] for k in BATCH_INPUTS if batch.get(k) is not None})
    return kwargs


def unpack_batch(batch: Any, n_global: int = 2) -> dict[str, Any]:
    """Normalise a batch to ``{"global_views", "local_views", "masks", "labels"}``.

    Accepts the dict made by :class:`~dinokit.data.MultiCropCollate`, or seed 003's ``[X]`` /
    ``([X], y)`` where ``X`` lists the global crops then the local crops.
    """
    if isinstance(batch, dict):
        if "global_views" not in batch:
            raise ValueError(f"batch dict needs a 'global_views' key, got keys {sorted(batch)}")
        return {
            "global_views": list(batch["global_views"]),
            "local_views": list(batch.get("local_views") or []),
            "masks": batch.get("masks"),
            "mask_indices": batch.get("mask_indices"),
            "mask_weights": batch.get("mask_weights"),
            "labels": batch.get("labels"),
        }
    labels = None
    if (
        isinstance(batch, (list, tuple))
        and len(batch) == 2
        and isinstance(batch[0], (list, tuple))
        and not isinstance(batch[1], (list, tuple))
    ):
        batch, labels = batch
    if not isinstance(batch, (list, tuple)) or not all(isinstance(v, Tensor) for v in batch):
        raise ValueError(
            "a batch must be a dict from MultiCropCollate, [X] or ([X], y) with X a list of "
            f"view tensors; got {type(batch).__name__}"
        )
    if len(batch) < n_global:
        raise ValueError(f"batch has {len(batch)} views but n_global={n_global} global views are expected")
    return {
        "global_views": list(batch[:n_global]),
        "local_views": list(batch[n_global:]),
        "masks": None,
        "labels": labels,
    }


class DINOModule(pl.LightningModule):
    """Lightning wrapper around a method module (``self.method``).

    Args:
        method: a :class:`~dinokit.methods.base.SelfDistillationMethod` (DINO, DINOv2, DINOv3).
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"``, ``"lars"``, an optimiser class, or a
            callable ``groups -> Optimizer``.
        lr: base learning rate for a global batch of ``lr_reference_batch`` (scaled by
            ``lr_scaling``: "linear", "sqrt" or "none").
        min_lr, warmup_epochs, warmup_start_lr: the LR schedule (linear warm-up, then cosine);
            ``lr_schedule="constant"`` keeps the scaled LR fixed.
        weight_decay, weight_decay_end: cosine weight-decay schedule.
        clip_grad, clip_mode: gradient clipping norm (0 = off), "per_param" (DINO) or "global".
        freeze_last_layer_epochs: epochs with the prototypes frozen.
        layer_decay, patch_embed_lr_mult: ViT layer-wise LR decay and patch-embedding multiplier.
        exclude_bias_and_norm_wd: no weight decay on biases, norms and 1-D tensors.
        momentum, betas, optimizer_kwargs: optimiser settings.
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
        freeze_last_layer_epochs: int = 1,
        freeze_last_layer_mode: str = "cancel_grad",
        no_decay_rule: str = "dinokit",
        max_nonfinite_steps: int = 3,
        augment: Callable[..., dict[str, Any]] | None = None,
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
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
        if freeze_last_layer_mode not in ("cancel_grad", "zero_lr"):
            raise ValueError("freeze_last_layer_mode must be 'cancel_grad' or 'zero_lr', got "
                             f"{freeze_last_layer_mode!r}")
        if lr_schedule not in ("warmup_cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'warmup_cosine' or 'constant', got {lr_schedule!r}")
        self.method = method
        method.check_finite = False  # checked at logging steps instead (no per-step host sync)
        self.optimizer_spec = optimizer
        self.lr, self.lr_scaling, self.lr_reference_batch = lr, lr_scaling, lr_reference_batch
        self.lr_schedule_kind, self.min_lr = lr_schedule, min_lr
        self.warmup_epochs, self.warmup_start_lr = warmup_epochs, warmup_start_lr
        self.weight_decay, self.weight_decay_end = weight_decay, weight_decay_end
        self.clip_grad, self.clip_mode = clip_grad, clip_mode
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.freeze_last_layer_mode, self.no_decay_rule = freeze_last_layer_mode, no_decay_rule
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        # data.augment_on=device: batches bring uint8 images; multi-crop runs batched on the device.
        self.augment, self.seed = augment, int(seed)
        # Device-side counters of the non-finite guard (read only at logging steps).
        self._bad_streak: Tensor | None = None
        self._bad_max_streak: Tensor | None = None
        self._bad_total: Tensor | None = None
        self.layer_decay, self.patch_embed_lr_mult = layer_decay, patch_embed_lr_mult
        self.exclude_bias_and_norm_wd = exclude_bias_and_norm_wd
        self.momentum, self.betas = momentum, tuple(betas)
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.n_global = n_global
        self.run_config = config or {}
        self.lr_schedule: Callable[[int], float] | None = None
        self.wd_schedule: Callable[[int], float] | None = None
        self._scheduled_step = -1

    # ------------------------------------------------------------------ setup
    def global_batch_size(self) -> int:
        """Images per optimiser step over all processes."""
        dl = self.trainer.train_dataloader
        per_device = getattr(dl, "batch_size", None) or 1
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch."""
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("the training dataloader must have a length")
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def build_schedules(self, total_steps: int, steps_per_epoch: int, global_batch: int) -> None:
        """LR, weight-decay and momentum schedules over ``total_steps`` optimiser steps."""
        peak = scaled_lr(self.lr, global_batch, self.lr_scaling, self.lr_reference_batch)
        warmup = min(round(self.warmup_epochs * steps_per_epoch), total_steps)
        if self.lr_schedule_kind == "constant":
            self.lr_schedule = lambda step: peak
        else:
            self.lr_schedule = CosineSchedule(
                peak, min(self.min_lr, peak), total_steps, warmup, self.warmup_start_lr
            )
        self.wd_schedule = CosineSchedule(self.weight_decay, self.weight_decay_end, total_steps)
        self.freeze_steps = min(round(self.freeze_last_layer_epochs * steps_per_epoch), total_steps)
        self.method.set_total_steps(total_steps, steps_per_epoch)
        self.peak_lr = peak

    def on_train_start(self) -> None:
        total = int(self.trainer.estimated_stepping_batches)
        self.build_schedules(total, self.steps_per_epoch(), self.global_batch_size())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        method = self.method
        last_ids = {id(p) for p in method.last_layer_parameters()}
        named = list(method.student.named_parameters())
        backbone = method.student_backbone
        n_blocks = len(getattr(getattr(backbone, "model", None), "blocks", []) or [])
        groups = param_groups(
            named,
            exclude_bias_and_norm_wd=self.exclude_bias_and_norm_wd,
            no_decay_rule=self.no_decay_rule,
            layer_decay=self.layer_decay,
            n_blocks=n_blocks,
            patch_embed_lr_mult=self.patch_embed_lr_mult,
            last_layer_names={n for n, p in named if id(p) in last_ids},
        )
        spec = self.optimizer_spec
        if isinstance(spec, str):
            if self.optimizer_kwargs:
                opt = build_optimizer(spec, groups, momentum=self.momentum, betas=self.betas)
                for g in opt.param_groups:
                    g.update(self.optimizer_kwargs)
                return opt
            return build_optimizer(spec, groups, momentum=self.momentum, betas=self.betas)
        if isinstance(spec, torch.optim.Optimizer):
            raise TypeError("pass an optimizer class or factory, not an instance bound to other params")
        opt = spec(groups, **self.optimizer_kwargs)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}, not an Optimizer")
        for g in opt.param_groups:
            g.setdefault("lr_scale", 1.0)
            g.setdefault("wd_scale", 1.0)
        return opt

    # ------------------------------------------------------------------ step
    def _apply_schedules(self) -> None:
        step = self.global_step
        if step == self._scheduled_step or self.lr_schedule is None:
            return
        lr, wd = self.lr_schedule(step), self.wd_schedule(step)  # type: ignore[misc]
        opt = self.optimizers()
        opt = getattr(opt, "optimizer", opt)
        frozen = self.freeze_last_layer_mode == "zero_lr" and step < getattr(self, "freeze_steps", 0)
        set_group_hyperparameters(opt, lr, wd, last_layer_lr=0.0 if frozen else None)
        self._scheduled_step = step
        self._current = {"lr": lr, "wd": wd}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.augment is not None and isinstance(batch, dict) and "images" in batch:
            # One CPU generator per step, seeded from the run seed and the step: exact on resume.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
            batch = {**batch, **self.augment(batch["images"], g, sizes=batch.get("sizes"))}
        return batch

    def on_train_epoch_start(self) -> None:
        self.method.set_epoch(self.current_epoch)

    def forward_batch(self, batch: Any) -> Any:
        """Run the method on a batch (dict or list form); returns its typed output."""
        b = unpack_batch(batch, self.n_global)
        return self.method(**method_inputs(b))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._apply_schedules()
        out = self.forward_batch(batch)
        bsz = out.student_logits.shape[1] if getattr(out, "student_logits", None) is not None else None
        metrics = {"train/loss": out.loss.detach()}
        for name, v in (getattr(out, "losses", None) or {}).items():  # each declared loss term
            metrics[f"train/{name}"] = v
        for name in ("teacher_entropy", "teacher_kl_uniform"):
            v = getattr(out, name, None)
            if v is not None:
                metrics[f"train/{name}"] = v.detach() if isinstance(v, Tensor) else v
        cur = getattr(self, "_current", {"lr": 0.0, "wd": 0.0})
        metrics.update({
            "train/lr": cur["lr"],
            "train/wd": cur["wd"],
            "train/momentum": self.method.momentum(),
            "train/teacher_temp": float(self.method.teacher_temperature),
        })
        self.log("train/loss", metrics.pop("train/loss"), prog_bar=True, batch_size=bsz)
        self.log_dict(metrics, batch_size=bsz)
        if batch_idx % self.trainer.log_every_n_steps == 0:
            self._check_nonfinite()
        return out.loss

    def _check_nonfinite(self) -> None:
        """At logging steps only (one host read): stop after ``max_nonfinite_steps`` consecutive
        skipped steps."""
        if self._bad_max_streak is None:
            return
        self.log("train/nonfinite_steps", self._bad_total.float())
        worst = int(self._bad_max_streak)
        if worst >= self.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"{worst} consecutive training steps had a non-finite loss or gradient (by step "
                f"{self.global_step}, epoch {self.current_epoch}); each was skipped (no weight, EMA, "
                "centre or optimiser update). Likely causes: fp16 overflow (use "
                "trainer.precision=bf16-mixed), a learning rate too high (lower optim.lr), or bad "
                "input (NaN pixels)"
            )

    def on_after_backward(self) -> None:
        frozen = self.current_epoch < self.freeze_last_layer_epochs
        if self.freeze_last_layer_mode == "cancel_grad" and frozen:
            self.method.cancel_last_layer_gradients()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if self.clip_grad <= 0:
            return
        if self.clip_mode == "global":
            self.clip_gradients(optimizer, gradient_clip_val=self.clip_grad,
                                gradient_clip_algorithm="norm")
        elif self.clip_mode == "per_module":  # DINOv2/v3: backbone and each head by its own norm
            clip_per_module_({k: [p for p in m.parameters() if p.requires_grad]
                              for k, m in self.method.student.items()}, self.clip_grad)
        elif self.clip_mode == "per_param":
            clip_per_parameter_(self.method.student_parameters(), self.clip_grad)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable | None = None) -> None:
        raw = getattr(optimizer, "optimizer", optimizer)
        state: dict[str, Tensor] = {}

        def guarded_closure() -> Any:
            loss = optimizer_closure() if optimizer_closure is not None else None
            state["bad"] = bad = nonfinite_flag(loss, self.method.student_parameters())
            if is_fused(raw):  # fused kernels skip the whole step on the device (GradScaler's hook)
                raw.found_inf, raw.grad_scale = bad.float(), None
            else:  # other optimisers: a non-finite step sees zero gradients
                zero_grads_if_(self.method.student_parameters(), bad)
            return loss

        try:
            super().optimizer_step(epoch, batch_idx, optimizer, guarded_closure)
        finally:
            for attr in ("found_inf", "grad_scale"):
                if hasattr(raw, attr):
                    delattr(raw, attr)
        bad = state.get("bad")
        self.method.update_teacher(apply=None if bad is None else ~bad)
        if bad is not None:
            b = bad.long()
            if self._bad_streak is None:
                self._bad_streak, self._bad_max_streak, self._bad_total = (
                    torch.zeros_like(b), torch.zeros_like(b), torch.zeros_like(b))
            self._bad_streak = (self._bad_streak + 1) * b
            self._bad_max_streak = torch.maximum(self._bad_max_streak, self._bad_streak)
            self._bad_total = self._bad_total + b

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
        checkpoint["dinokit"] = {"config": self.run_config, "rng": rng, "format": 1}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("dinokit")
        if not meta:
            return
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
