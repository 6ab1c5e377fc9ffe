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
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinokit.clock import Clock, Stage, StepValues
from dinokit.settings import OptimSettings, StageSettings
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
#: DINO's official rules: what ``"auto"`` (or ``None``) resolves to for a method that declares
#: none. ``main_dino.py``: lr 0.0005 per 256 images, scaled linearly; no layer-wise decay and no
#: patch-embedding multiplier.
DINO_RULES: dict[str, Any] = {"no_decay_rule": "dino", "clip_mode": "per_param",
                              "freeze_last_layer_mode": "cancel_grad", "layer_decay": 1.0,
                              "patch_embed_lr_mult": 1.0, "lr": 0.0005, "lr_scaling": "linear",
                              "lr_reference_batch": 256}
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
    """What a training step does besides the method's forward.

    Attributes:
        optim: the optimiser and its schedules (:class:`~dinokit.settings.OptimSettings`; its
            ``"auto"`` rules resolve to the method's official ones).
        precision: a :data:`STEP_PRECISIONS` name; fp16 uses a gradient scaler.
        accumulate: micro-batches per optimiser step.
        max_nonfinite_steps: stop after this many consecutive skipped (non-finite) steps.
    """

    optim: OptimSettings = field(default_factory=OptimSettings)
    precision: str = "32-true"
    accumulate: int = 1
    max_nonfinite_steps: int = 3

    def __post_init__(self) -> None:
        if self.precision not in STEP_PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(STEP_PRECISIONS)}, got {self.precision!r}")
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        o = self.optim
        choices = {"lr_scaling": (None, "linear", "sqrt", "none"), "lr_schedule": LR_SCHEDULES,
                   "clip_mode": ("auto", *CLIP_MODES), "freeze_last_layer_mode": ("auto", *FREEZE_MODES)}
        for name, allowed in choices.items():
            if getattr(o, name) not in allowed:
                raise ValueError(f"optim.{name} must be one of {allowed}, got {getattr(o, name)!r}")
        for name in ("lr", "min_lr", "warmup_epochs", "warmup_start_lr", "clip_grad",
                     "freeze_last_layer_epochs"):
            if name == "lr" and o.lr is None:
                continue
            if not math.isfinite(getattr(o, name)) or getattr(o, name) < 0:
                raise ValueError(f"optim.{name} must be a finite number >= 0, got {getattr(o, name)}")


def resolve_rules(optim: OptimSettings, rules: Mapping[str, Any]) -> OptimSettings:
    """``optim`` with each rule left to the method (``"auto"``: ``no_decay_rule``, ``clip_mode``,
    ``freeze_last_layer_mode``; ``None``: ``layer_decay``, ``patch_embed_lr_mult``) replaced by the
    method's official one (``rules``; DINO's when the method declares none)."""
    changes = {k: rules.get(k, DINO_RULES[k]) for k in DINO_RULES if getattr(optim, k) in ("auto", None)}
    return dataclasses.replace(optim, **changes) if changes else optim


def build_method_optimizer(
    method: nn.Module, optim: OptimSettings | None = None, spec: OptimizerSpec | None = None, *,
    exclude_bias_and_norm_wd: bool = True, optimizer_kwargs: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The optimiser over the student's parameter groups: ``optim``'s weight-decay rule (``auto``:
    the method's official one), layer-wise LR decay, patch-embedding LR multiplier, betas and
    momentum, and the last-layer flag. ``spec`` replaces ``optim.optimizer``: "adamw" | "adam" |
    "sgd" | "lars", an optimiser class, or a callable ``groups -> Optimizer``."""
    optim = resolve_rules(optim or OptimSettings(), getattr(method, "rules", {}))
    spec = optim.optimizer if spec is None else spec
    last_ids = {id(p) for p in method.last_layer_parameters()}
    groups = []
    for net, lr_mult in trained_networks(method).values():  # one set of groups per trained network
        named = list(net.named_parameters())
        n_blocks = len(getattr(getattr(net["backbone"], "model", None), "blocks", []) or [])
        for g in param_groups(
            named, exclude_bias_and_norm_wd=exclude_bias_and_norm_wd, no_decay_rule=optim.no_decay_rule,
            layer_decay=optim.layer_decay, n_blocks=n_blocks, patch_embed_lr_mult=optim.patch_embed_lr_mult,
            last_layer_names={n for n, p in named if id(p) in last_ids},
        ):
            g["lr_scale"] *= lr_mult
            groups.append(g)
    extra = dict(optimizer_kwargs or {})
    if isinstance(spec, str):
        opt = build_optimizer(spec, groups, momentum=optim.momentum, betas=tuple(optim.betas))
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


def trained_networks(method: nn.Module) -> dict[str, tuple[nn.ModuleDict, float]]:
    """``name -> (network, lr multiplier)`` of what the optimiser trains: the method's
    ``trained_networks()`` (several students of a distillation), else its one ``student``."""
    if hasattr(method, "trained_networks"):
        return method.trained_networks()
    return {"": (method.student, 1.0)}


def use_tf32_matmuls() -> None:
    """TF32 tensor cores for the fp32 matmuls left outside autocast, on CUDA (a process-wide
    setting: the front doors call it when training starts, never a constructor). Kept when the
    user already chose a precision other than ``"highest"``."""
    if torch.cuda.is_available() and torch.get_float32_matmul_precision() == "highest":
        torch.set_float32_matmul_precision("high")


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

    Accepts the dict made by :class:`~dinokit.data.MultiCropCollate`, or nidl's ``[X]`` /
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
        stages: the run's stages (:class:`~dinokit.settings.StageSettings`; none: one stage).
        n_global: global views in list-style batches.
        lr_interval: ``"step"`` (the official per-iteration learning rate) or ``"epoch"`` (held
            within each epoch; the estimator's ``interval="epoch"``).
        stage_lengths: realised lengths of stages known before the run, by index (0: a stage
            skipped, e.g. a head warm-up when the starting weights gave heads); a resumed run's
            checkpoint state replaces them (:meth:`load_state_dict`).

    Call :meth:`plan` once the run length is known (it builds the run's
    :class:`~dinokit.clock.Clock`), then call the object with each (micro-)batch.
    """

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer, settings: StepSettings, *,
                 stages: Sequence[StageSettings] = (), n_global: int = 2, lr_interval: str = "step",
                 stage_lengths: Mapping[int, int] | None = None):
        self.method, self.optimizer, self.settings = method, optimizer, settings
        self.optim = resolve_rules(settings.optim, getattr(method, "rules", {}))
        self.stages, self.n_global, self.lr_interval = list(stages), n_global, lr_interval
        self.stage_lengths = {int(i): int(n) for i, n in (stage_lengths or {}).items()}
        align_kernel_flags(optimizer)  # a resumed state dict may carry another run's kernel choice
        method.prepare_for_training_step()
        self.autocast_dtype = STEP_PRECISIONS[settings.precision]
        self.scaler = None
        if self.autocast_dtype is torch.float16:
            device = next(iter(method.parameters())).device.type
            self.scaler = torch.amp.GradScaler(device)
        self.clock: Clock | None = None
        self._global_batch = 1
        self.stage: Stage | None = None
        self._values: StepValues | None = None
        self._bad_streak: Tensor | None = None
        self._bad_max_streak: Tensor | None = None
        self._bad_total: Tensor | None = None

    @property
    def peak_lr(self) -> float:
        return self.clock.peak_lr if self.clock is not None else self.optim.lr

    # ------------------------------------------------------------------ plan
    def plan(self, total_steps: int, steps_per_epoch: int, global_batch: int) -> Clock:
        """Build the run's clock over ``total_steps`` optimiser steps of ``global_batch`` images."""
        self._global_batch = global_batch
        self.clock = Clock(self.optim, self.method.teacher_settings, self.method.term_timings(),
                           total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                           global_batch=global_batch,
                           stages=self.stages, temperature_endpoint=self.method.temperature_endpoint,
                           freeze_in_epochs=self.optim.freeze_last_layer_mode == "cancel_grad",
                           lr_interval=self.lr_interval, stage_lengths=self.stage_lengths)
        return self.clock

    def values(self, step: int, epoch: int | None = None) -> StepValues:
        """Every scheduled value of optimiser step ``step`` (see :meth:`Clock.at`)."""
        if self.clock is None:
            raise RuntimeError("call TrainingStep.plan(total_steps, steps_per_epoch, global_batch) first")
        return self.clock.at(step, epoch)

    def _enter_stage(self, stage: Stage) -> None:
        if stage != self.stage:
            self.method.freeze(stage.frozen)
            self.stage = stage

    def _apply_schedules(self, values: StepValues) -> None:
        o, opt = self.optim, self.optimizer
        frozen = o.freeze_last_layer_mode == "zero_lr" and values.last_layer_frozen
        if values.lr is None:  # an external scheduler owns the LR: set weight decay only
            lrs = [g["lr"] for g in opt.param_groups]
            set_group_hyperparameters(opt, 0.0, values.weight_decay)
            for g, lr in zip(opt.param_groups, lrs, strict=True):
                g["lr"] = 0.0 if frozen and g.get("is_last_layer") else lr
        else:
            set_group_hyperparameters(opt, values.lr, values.weight_decay,
                                      last_layer_lr=0.0 if frozen else None)

    # ------------------------------------------------------------------ the step
    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's precision context (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(iter(self.method.parameters())).device.type
        return torch.autocast(device, dtype=self.autocast_dtype)

    def forward(self, batch: Any, values: StepValues | None = None) -> Any:
        """The method's typed output for a batch (dict or list form), under the run's precision,
        with ``values`` (default: those of the current step, or the method's own time before the
        first step)."""
        values = values if values is not None else self._values
        with self.autocast():
            return self.method(**method_inputs(unpack_batch(batch, self.n_global)), values=values)

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
            self._values = values = self.values(step, epoch)
            self._enter_stage(values.stage)
            self._apply_schedules(values)
            self.optimizer.zero_grad(set_to_none=True)
        values = self._values
        out = self.forward(batch, values)
        loss = out.loss
        scaled = loss / s.accumulate if s.accumulate > 1 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        (backward or Tensor.backward)(scaled)
        metrics = self._metrics(out, values)
        if not last:
            return StepResult(out, metrics, False, _batch_size(out))
        method.drop_frozen_gradients()
        params = method.student_parameters()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.optim.freeze_last_layer_mode == "cancel_grad" and values.last_layer_frozen:
            method.cancel_last_layer_gradients()
        self._clip(params)
        bad = nonfinite_flag(loss, params)
        # The step is skipped on the device when anything is non-finite (with fp16 that is the
        # scaler's overflow check too: unscale_ recorded it for the scaler's update).
        skip_step_if_(self.optimizer, bad, step=optimizer_step)
        if self.scaler is not None:
            self.scaler.update()
        ok = ~bad
        method.after_optimizer_step(values.momentum, step, apply=ok, micro_batches=micro + 1)
        # With fp16 the scaler's skipped overflow steps are routine: only a non-finite loss counts.
        self._count(bad if self.scaler is None else ~torch.isfinite(loss.detach()))
        return StepResult(out, metrics, True, _batch_size(out))

    @torch.no_grad()
    def _clip(self, params: list[Tensor]) -> None:
        s = self.optim
        if s.clip_grad <= 0 or s.clip_mode == "none":
            return
        if s.clip_mode == "per_param":
            if any(hasattr(p, "to_local") for p in params):  # FSDP2: norms summed over the shards
                clip_per_parameter_sharded_(params, s.clip_grad)
            else:
                clip_per_parameter_(params, s.clip_grad)
        elif s.clip_mode == "per_module":  # DINOv2/v3: backbone and each head by its own norm
            clip_per_module_({f"{name}.{k}" if name else k: [p for p in m.parameters() if p.requires_grad]
                              for name, (net, _) in trained_networks(self.method).items()
                              for k, m in net.items()}, s.clip_grad)
        else:  # one norm per trained network (a distillation's students are clipped apart)
            for net, _ in trained_networks(self.method).values():
                grads = [p for p in net.parameters() if p.requires_grad and p.grad is not None]
                if grads:
                    torch.nn.utils.clip_grad_norm_(grads, s.clip_grad, foreach=True)

    def _metrics(self, out: Any, values: StepValues) -> dict[str, Tensor | float]:
        metrics: dict[str, Tensor | float] = {"loss": out.loss.detach()}
        for name, v in (getattr(out, "losses", None) or {}).items():  # each declared loss term
            metrics[name] = v.detach() if isinstance(v, Tensor) else v
        for name in ("teacher_entropy", "teacher_kl_uniform"):
            v = getattr(out, name, None)
            if v is not None:
                metrics[name] = v.detach() if isinstance(v, Tensor) else v
        lr = values.lr if values.lr is not None else next(
            (g["lr"] for g in self.optimizer.param_groups if g.get("lr_scale", 1.0) == 1.0),
            self.optimizer.param_groups[0]["lr"])
        metrics.update({"lr": lr, "weight_decay": values.weight_decay, "teacher_momentum": values.momentum,
                        "teacher_temperature": values.teacher_temperature,
                        "stage": float(values.stage.index)})
        return metrics

    # ------------------------------------------------------------------ a stage's early end
    def check_stage_end(self, output: Any, step: int) -> bool:
        """At logging steps only (one host read, and only inside a stage with
        ``until_teacher_entropy``): end the stage of optimiser step ``step`` after that step when
        the teacher's mean target entropy in ``output`` (averaged over the processes) is below
        ``until_teacher_entropy x ln K``. Returns whether it ended."""
        stage = self._values.stage if self._values is not None else None
        if self.clock is None or stage is None or stage.until_teacher_entropy is None:
            return False
        entropy, logits = getattr(output, "teacher_entropy", None), getattr(output, "teacher_logits", None)
        inside = stage.start <= step < stage.end - 1  # the stage's last step ends it anyway
        if not (inside and isinstance(entropy, Tensor) and isinstance(logits, Tensor)):
            return False
        entropy = entropy.detach().float().clone()
        if dist.is_available() and dist.is_initialized():  # every process decides alike
            dist.all_reduce(entropy, op=dist.ReduceOp.SUM)
            entropy /= dist.get_world_size()
        value = float(entropy)
        if not math.isfinite(value) or value >= stage.until_teacher_entropy * math.log(logits.shape[-1]):
            return False
        self.clock.end_stage(stage.index, step)
        return True

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
        """The stages' realised lengths (where they ended otherwise than planned) and the
        loss-scaler state (fp16 only)."""
        lengths = self.clock.stage_lengths if self.clock is not None else self.stage_lengths
        state: dict[str, Any] = {"stage_lengths": dict(lengths)}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if "stage_lengths" in state:
            self.stage_lengths = {int(i): int(n) for i, n in state["stage_lengths"].items()}
            if self.clock is not None:  # placed already: place the stages again where the run had them
                c = self.clock
                self.plan(c.total_steps, c.steps_per_epoch, self._global_batch)


def _batch_size(out: Any) -> int | None:
    logits = getattr(out, "student_logits", None)
    return int(logits.shape[1]) if isinstance(logits, Tensor) and logits.dim() >= 2 else None
