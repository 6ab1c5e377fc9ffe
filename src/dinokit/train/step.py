"""One training step, shared by every front door (Lightning module, plain trainer, estimator).

An optimiser step of DINO / DINOv2 / DINOv3, in the order of the official ``train.py`` files:
this step's scheduled values (learning rate: linear warm-up then cosine, scaled by the global
batch; weight decay: cosine; DINOv2/v3's last layer at LR 0 while frozen) -> the method's forward
under the run's precision -> backward (the loss scaled for fp16) -> DINO's last-layer gradient
cancel while frozen -> clipping (DINO per parameter, DINOv2/v3 per module, or one global norm) ->
a guard that makes a non-finite step a no-op, decided on the device -> the optimiser step -> the
EMA teacher and the EMA centres, moved only after a finite step.

Gradient accumulation (``accumulate=k``): the first ``k - 1`` micro-batches run forward and
backward only; the k-th finishes the step. The EMA centres are updated once per optimiser step
with the mean of the micro-batches' teacher means (what one batch of ``k`` micro-batches gives).
Sinkhorn-Knopp and KoLeo see one micro-batch at a time (as a smaller global batch would).

Nothing here reads a tensor back to the host. Metrics are device tensors (and Python floats for
the schedules) handed to the caller, who reads them once per logging interval; the non-finite
guard's counters are read only by :meth:`TrainingStep.check_nonfinite`, at those intervals.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinokit.losses.centering import EMACenter
from dinokit.schedules import CosineSchedule, scaled_lr
from dinokit.train.optim import (
    align_kernel_flags,
    build_optimizer,
    clip_per_module_,
    clip_per_parameter_,
    local_shard,
    param_groups,
    set_group_hyperparameters,
    skip_step_if_,
)
from dinokit.train.strategy import clip_per_parameter_sharded_

CLIP_MODES = ("per_param", "per_module", "global", "none")
FREEZE_MODES = ("cancel_grad", "zero_lr")
LR_SCHEDULES = ("warmup_cosine", "constant", "none")
#: ``trainer.precision`` values the step runs: full fp32, or autocast to bf16 / fp16 (+ loss scaling).
STEP_PRECISIONS = {"32": None, "32-true": None, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
                   "16": torch.float16, "16-mixed": torch.float16}
OptimizerSpec = str | type | Callable[..., torch.optim.Optimizer]


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""

    exit_code = 3


@dataclass
class StepSettings:
    """What a training step does besides the method's forward (the ``optim`` part of a recipe).

    Attributes:
        lr: base learning rate for a global batch of ``lr_reference_batch`` (scaled by
            ``lr_scaling``: "linear" as DINO, "sqrt" as DINOv2, or "none").
        lr_schedule: "warmup_cosine" (linear warm-up from ``warmup_start_lr`` over
            ``warmup_epochs``, then a cosine to ``min_lr``), "constant", or "none" (the caller
            owns ``group["lr"]``, e.g. a torch scheduler; weight decay is still scheduled).
        weight_decay, weight_decay_end: the weight-decay cosine.
        clip_grad, clip_mode: clipping norm (0 = off) and rule (:data:`CLIP_MODES`).
        freeze_last_layer_epochs, freeze_last_layer_mode: prototypes frozen for the first epochs,
            by dropping their gradients (DINO, counted in epochs) or by LR 0 (DINOv2/v3, counted in
            optimiser steps).
        max_nonfinite_steps: stop after this many consecutive skipped (non-finite) steps.
        accumulate: micro-batches per optimiser step.
        precision: a :data:`STEP_PRECISIONS` name; fp16 uses a gradient scaler.
    """

    lr: float = 0.0005
    lr_scaling: str = "linear"
    lr_reference_batch: int = 256
    lr_schedule: str = "warmup_cosine"
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    clip_mode: str = "per_param"
    freeze_last_layer_epochs: float = 1
    freeze_last_layer_mode: str = "cancel_grad"
    max_nonfinite_steps: int = 3
    accumulate: int = 1
    precision: str = "32-true"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = {"lr_scaling": ("linear", "sqrt", "none"), "lr_schedule": LR_SCHEDULES,
                   "clip_mode": CLIP_MODES, "freeze_last_layer_mode": FREEZE_MODES,
                   "precision": tuple(STEP_PRECISIONS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        for name in ("lr", "min_lr", "warmup_epochs", "warmup_start_lr", "clip_grad",
                     "freeze_last_layer_epochs"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "extra")


def build_method_optimizer(
    method: nn.Module, spec: OptimizerSpec = "adamw", *, no_decay_rule: str = "dinokit",
    exclude_bias_and_norm_wd: bool = True, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0,
    momentum: float = 0.9, betas: Sequence[float] = (0.9, 0.999),
    optimizer_kwargs: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The optimiser over the student's parameter groups (weight-decay rule, layer-wise LR decay,
    patch-embedding LR multiplier, last-layer flag). ``spec``: "adamw" | "adam" | "sgd" | "lars",
    an optimiser class, or a callable ``groups -> Optimizer``."""
    last_ids = {id(p) for p in method.last_layer_parameters()}
    named = list(method.student.named_parameters())
    n_blocks = len(getattr(getattr(method.student_backbone, "model", None), "blocks", []) or [])
    groups = param_groups(
        named, exclude_bias_and_norm_wd=exclude_bias_and_norm_wd, no_decay_rule=no_decay_rule,
        layer_decay=layer_decay, n_blocks=n_blocks, patch_embed_lr_mult=patch_embed_lr_mult,
        last_layer_names={n for n, p in named if id(p) in last_ids},
    )
    extra = dict(optimizer_kwargs or {})
    if isinstance(spec, str):
        opt = build_optimizer(spec, groups, momentum=momentum, betas=tuple(betas))
        for g in opt.param_groups:
            g.update(extra)
        return opt
    if isinstance(spec, torch.optim.Optimizer):
        raise TypeError("pass an optimizer class or factory, not an instance bound to other params")
    opt = spec(groups, **extra)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer factory returned {type(opt).__name__}, not an Optimizer")
    for g in opt.param_groups:
        g.setdefault("lr_scale", 1.0)
        g.setdefault("wd_scale", 1.0)
    return opt


@torch.no_grad()
def nonfinite_flag(loss: Tensor | None, params: Sequence[Tensor]) -> Tensor:
    """0-dim bool tensor: the loss or any gradient is NaN/Inf (decided on the device).

    With FSDP2-sharded gradients each process sees its shards only: the flag is all-reduced
    (max) so that every process skips the same steps.
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = [local_shard(g) for g in grads]
    flags = [] if loss is None else [~torch.isfinite(local_shard(loss.detach())).all()]
    if local:
        norms = torch._foreach_norm(local)
        flags.append(~torch.isfinite(torch.stack([n.float() for n in norms])).all())
    if not flags:
        return torch.zeros((), dtype=torch.bool)
    flag = torch.stack(flags).any()
    if any(g is not loc for g, loc in zip(grads, local)) and dist.is_available() and dist.is_initialized():
        as_int = flag.to(torch.int32)
        dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
        flag = as_int.bool()
    return flag


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
    """Normalise a batch to ``{"global_views", "local_views", "masks", "labels", ...}``.

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


@dataclass
class StepResult:
    """What one call of :class:`TrainingStep` returns.

    ``output`` is the method's typed output; ``metrics`` maps names to 0-dim device tensors or
    Python floats (never read back here); ``stepped`` is False for a non-final micro-batch.
    """

    output: Any
    metrics: dict[str, Tensor | float]
    stepped: bool
    batch_size: int | None = None


class TrainingStep:
    """One optimiser step of a self-distillation method (see the module docstring).

    Args:
        method: a :class:`~dinokit.methods.base.SelfDistillationMethod`.
        optimizer: the optimiser over the student (:func:`build_method_optimizer`).
        settings: :class:`StepSettings`.
        n_global: global views in list-style batches.

    Call :meth:`plan` once the run length is known, then call the object with each (micro-)batch.
    """

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer, settings: StepSettings,
                 *, n_global: int = 2):
        self.method, self.optimizer, self.settings = method, optimizer, settings
        align_kernel_flags(optimizer)  # a resumed state dict may carry another run's kernel choice
        if torch.cuda.is_available() and torch.get_float32_matmul_precision() == "highest":
            # TF32 tensor cores for the fp32 matmuls left outside autocast (every front door alike)
            torch.set_float32_matmul_precision("high")
        self.n_global = n_global
        method.check_finite = False  # read at logging steps instead (no per-step host sync)
        self.autocast_dtype = STEP_PRECISIONS[settings.precision]
        self.scaler = None
        if self.autocast_dtype is torch.float16:
            device = next(iter(method.parameters())).device.type
            self.scaler = torch.amp.GradScaler(device)
        # EMA centres move once per optimiser step, after the guard (accumulated over micro-batches).
        self.centres = [m for m in method.modules() if isinstance(m, EMACenter)]
        for c in self.centres:
            c.defer_updates(True)
        self.lr_schedule: Callable[[int], float] | None = None
        self.wd_schedule: Callable[[int], float] | None = None
        self.freeze_steps = 0
        self.peak_lr = settings.lr
        self._bad_streak: Tensor | None = None
        self._bad_max_streak: Tensor | None = None
        self._bad_total: Tensor | None = None

    # ------------------------------------------------------------------ plan
    def plan(self, total_steps: int, steps_per_epoch: int, global_batch: int) -> None:
        """Build the schedules over ``total_steps`` optimiser steps of ``global_batch`` images."""
        s = self.settings
        total_steps, steps_per_epoch = max(1, int(total_steps)), max(1, int(steps_per_epoch))
        peak = scaled_lr(s.lr, global_batch, s.lr_scaling, s.lr_reference_batch)
        warmup = min(round(s.warmup_epochs * steps_per_epoch), total_steps)
        if s.lr_schedule == "warmup_cosine":
            self.lr_schedule = CosineSchedule(peak, min(s.min_lr, peak), total_steps, warmup,
                                              s.warmup_start_lr)
        elif s.lr_schedule == "constant":
            self.lr_schedule = _Constant(peak)
        else:
            self.lr_schedule = None
        self.wd_schedule = CosineSchedule(s.weight_decay, s.weight_decay_end, total_steps)
        self.freeze_steps = min(round(s.freeze_last_layer_epochs * steps_per_epoch), total_steps)
        self.steps_per_epoch = steps_per_epoch
        self.method.set_total_steps(total_steps, steps_per_epoch)
        self.peak_lr = peak

    def scheduled(self, step: int) -> dict[str, float]:
        """This optimiser step's learning rate (None when the caller owns it) and weight decay."""
        if self.wd_schedule is None:
            raise RuntimeError("call TrainingStep.plan(total_steps, steps_per_epoch, global_batch) first")
        lr = self.lr_schedule(step) if self.lr_schedule is not None else None
        return {"lr": lr, "wd": self.wd_schedule(step)}

    def _apply_schedules(self, step: int) -> dict[str, float]:
        s = self.settings
        values = self.scheduled(step)
        frozen = s.freeze_last_layer_mode == "zero_lr" and step < self.freeze_steps
        opt = self.optimizer
        if values["lr"] is None:  # an external scheduler owns the LR: set weight decay only
            lrs = [g["lr"] for g in opt.param_groups]
            set_group_hyperparameters(opt, 0.0, values["wd"])
            for g, lr in zip(opt.param_groups, lrs, strict=True):
                g["lr"] = 0.0 if frozen and g.get("is_last_layer") else lr
            values["lr"] = next((g["lr"] for g in opt.param_groups if g.get("lr_scale", 1.0) == 1.0),
                                opt.param_groups[0]["lr"])
        else:
            set_group_hyperparameters(opt, values["lr"], values["wd"], last_layer_lr=0.0 if frozen else None)
        return values

    # ------------------------------------------------------------------ the step
    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's precision context (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(iter(self.method.parameters())).device.type
        return torch.autocast(device, dtype=self.autocast_dtype)

    def forward(self, batch: Any) -> Any:
        """The method's typed output for a batch (dict or list form), under the run's precision."""
        with self.autocast():
            return self.method(**method_inputs(unpack_batch(batch, self.n_global)))

    def __call__(self, batch: Any, *, step: int, epoch: int, micro: int = 0, last: bool | None = None,
                 backward: Callable[[Tensor], Any] | None = None,
                 optimizer_step: Callable[[], Any] | None = None) -> StepResult:
        """Run (micro-)batch ``micro`` of optimiser step ``step`` in epoch ``epoch``; ``last``
        (default: ``micro == accumulate - 1``) finishes the step, e.g. at an epoch's short end.

        ``backward(loss)`` defaults to ``loss.backward()``; ``optimizer_step()`` to
        ``optimizer.step()`` (Lightning passes its wrapped optimiser's step so its step counter
        moves). Both are hooks for the engine, not for changing the algorithm.
        """
        s, method = self.settings, self.method
        last = micro == s.accumulate - 1 if last is None else last
        if micro == 0:
            self._values = self._apply_schedules(step)
            method.set_epoch(epoch)
            self.optimizer.zero_grad(set_to_none=True)
        out = self.forward(batch)
        loss = out.loss
        scaled = loss / s.accumulate if s.accumulate > 1 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        (backward or Tensor.backward)(scaled)
        metrics = self._metrics(out)
        if not last:
            return StepResult(out, metrics, False, _batch_size(out))
        params = method.student_parameters()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if s.freeze_last_layer_mode == "cancel_grad" and epoch < s.freeze_last_layer_epochs:
            method.cancel_last_layer_gradients()
        self._clip(params)
        bad = nonfinite_flag(loss, params)
        if self.scaler is not None:  # the scaler skips inf/NaN gradients itself and lowers its scale
            self._scaler_step(optimizer_step)
        else:
            skip_step_if_(self.optimizer, bad, step=optimizer_step)
        ok = ~bad
        method.update_teacher(apply=ok)
        for c in self.centres:
            c.commit(micro + 1, apply=ok)
        # With fp16 the scaler's skipped overflow steps are routine: only a non-finite loss counts.
        self._count(bad if self.scaler is None else ~torch.isfinite(loss.detach()))
        return StepResult(out, metrics, True, _batch_size(out))

    def _scaler_step(self, optimizer_step: Callable[[], Any] | None) -> None:
        # Non-finite gradients (bad) are found by the scaler's unscale_ too: it skips the step.
        assert self.scaler is not None
        opt = self.optimizer
        if optimizer_step is None:
            self.scaler.step(opt)
        else:  # the engine's step function wraps opt.step(): route it through the scaler
            original = opt.step

            def scaled_step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
                opt.step = original  # type: ignore[method-assign]
                if closure is not None:  # the engine's hooks; the scaler takes no closure
                    closure()
                return self.scaler.step(opt, **kwargs)

            opt.step = scaled_step  # type: ignore[method-assign]
            try:
                optimizer_step()
            finally:
                opt.step = original  # type: ignore[method-assign]
        self.scaler.update()

    @torch.no_grad()
    def _clip(self, params: list[Tensor]) -> None:
        s = self.settings
        if s.clip_grad <= 0 or s.clip_mode == "none":
            return
        if s.clip_mode == "per_param":
            if any(hasattr(p, "to_local") for p in params):  # FSDP2: norms summed over the shards
                clip_per_parameter_sharded_(params, s.clip_grad)
            else:
                clip_per_parameter_(params, s.clip_grad)
        elif s.clip_mode == "per_module":  # DINOv2/v3: backbone and each head by its own norm
            clip_per_module_({k: [p for p in m.parameters() if p.requires_grad]
                              for k, m in self.method.student.items()}, s.clip_grad)
        else:
            grads = [p for p in params if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, s.clip_grad, foreach=True)

    def _metrics(self, out: Any) -> dict[str, Tensor | float]:
        metrics: dict[str, Tensor | float] = {"loss": out.loss.detach()}
        for name, v in (getattr(out, "losses", None) or {}).items():  # each declared loss term
            metrics[name] = v.detach() if isinstance(v, Tensor) else v
        for name in ("teacher_entropy", "teacher_kl_uniform"):
            v = getattr(out, name, None)
            if v is not None:
                metrics[name] = v.detach() if isinstance(v, Tensor) else v
        values = getattr(self, "_values", {"lr": 0.0, "wd": 0.0})
        metrics.update({"lr": values["lr"], "wd": values["wd"], "momentum": self.method.momentum(),
                        "teacher_temp": float(self.method.teacher_temperature)})
        return metrics

    # ------------------------------------------------------------------ the non-finite guard
    def _count(self, bad: Tensor) -> None:
        b = bad.long()
        if self._bad_streak is None:
            self._bad_streak, self._bad_max_streak, self._bad_total = (
                torch.zeros_like(b), torch.zeros_like(b), torch.zeros_like(b))
        self._bad_streak = (self._bad_streak + 1) * b
        self._bad_max_streak = torch.maximum(self._bad_max_streak, self._bad_streak)
        self._bad_total = self._bad_total + b

    @property
    def nonfinite_total(self) -> Tensor | None:
        """Skipped steps so far (a device tensor; None before the first step)."""
        return self._bad_total

    @property
    def worst_streak(self) -> Tensor | None:
        """The longest run of consecutive skipped steps so far (a device tensor)."""
        return self._bad_max_streak

    def check_nonfinite(self, step: int, epoch: int, worst: int | None = None) -> None:
        """At logging steps only (one host read, or none when the caller read ``worst_streak``):
        raise :class:`NonFiniteTrainingError` after ``max_nonfinite_steps`` consecutive skipped
        steps."""
        if worst is None:
            if self._bad_max_streak is None:
                return
            worst = int(self._bad_max_streak)
        if worst >= self.settings.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"{worst} consecutive training steps had a non-finite loss or gradient (by step "
                f"{step}, epoch {epoch}); each was skipped (no weight, EMA, centre or optimiser "
                "update). Likely causes: fp16 overflow (use trainer.precision=bf16-mixed), a "
                "learning rate too high (lower optim.lr), or bad input (NaN pixels)"
            )

    def state_dict(self) -> dict[str, Any]:
        """Loss-scaler state (fp16 only)."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class _Constant:
    """A constant schedule (picklable)."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, step: int) -> float:
        return self.value


def _batch_size(out: Any) -> int | None:
    logits = getattr(out, "student_logits", None)
    return int(logits.shape[1]) if isinstance(logits, Tensor) and logits.dim() >= 2 else None
