"""A scikit-learn-style DINO estimator (``fit`` / ``transform``) over the Lightning engine.

The surface and defaults follow nidl's DINO estimator; underneath it composes
:class:`~dinokit.DINO` and :class:`~dinokit.train.DINOModule` — no second implementation of the
algorithm or of the training step. Extra keyword arguments go to ``lightning.pytorch.Trainer`` and
survive ``get_params`` / ``set_params`` / ``sklearn.base.clone``.

The learning rate: ``"warmup_cosine"`` is the run's clock (:class:`~dinokit.clock.Clock`, the same
schedule as every front door, per step or per epoch); ``"none"`` keeps it constant; a torch
scheduler class, factory or instance is the user's own choice, built on the run's optimiser by
:class:`_SchedulerCallback` and stepped per ``interval`` (``"step"`` or ``"epoch"``).
Everything a fitted estimator holds is a module-level object, so it pickles and ``torch.save``s.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.data import DataLoader

from dinokit.data import (
    EvalTransform,
    MultiCropCollate,
    MultiCropConfig,
    MultiCropTransform,
    TensorImageDataset,
)
from dinokit.eval.features import extract_features
from dinokit.methods.dino import DINO
from dinokit.methods.distill import Distillation
from dinokit.settings import MethodSettings, OptimSettings
from dinokit.train.loader import ResumableDataLoader, SeededViews
from dinokit.train.module import DINOModule, unpack_batch
from dinokit.train.quiet import LIGHTNING_NOISE, NO_VAL_LOADER, quiet_lightning
from dinokit.train.step import STEP_PRECISIONS, StepSettings

OPTIMIZERS = {"sgd": "sgd", "adam": "adam", "adamW": "adamw", "adamw": "adamw"}
SCHEDULERS = ("none", "warmup_cosine")
DEFAULT_SCHEDULER_KWARGS = {"warmup_epochs": 10, "warmup_start_lr": 1e-6, "min_lr": 0.0, "interval": "step"}
#: lr_scheduler_kwargs keys read by the estimator itself (never passed to a scheduler class).
STEPPING_KEYS = ("interval", "monitor")
INTERVALS = ("step", "epoch")
_SCHEDULER_FORMS = ("lr_scheduler must be 'none', 'warmup_cosine', a torch LR scheduler class (its "
                    "arguments in lr_scheduler_kwargs), a callable optimizer -> scheduler, or a "
                    "scheduler instance whose constructor arguments can be read back")


# ---------------------------------------------------------------------- picklable building blocks
class _OptimizerFactory:
    """``groups -> Optimizer`` for an optimiser class or a template instance (picklable)."""

    def __init__(self, cls: type, defaults: dict[str, Any]):
        self.cls, self.defaults = cls, dict(defaults)

    def __call__(self, groups: list[dict], **kwargs: Any) -> torch.optim.Optimizer:
        return self.cls(groups, **{**self.defaults, **kwargs})


class _UserScheduler:
    """A scheduler class or factory called as ``factory(optimizer, **kwargs)``."""

    def __init__(self, factory: Any, kwargs: dict[str, Any]):
        self.factory, self.kwargs = factory, dict(kwargs)

    def __call__(self, optimizer: torch.optim.Optimizer, **_: Any) -> Any:
        try:
            sched = self.factory(optimizer, **self.kwargs)
        except TypeError as e:
            name = getattr(self.factory, "__name__", repr(self.factory))
            raise TypeError(f"lr_scheduler={name} rejected lr_scheduler_kwargs {self.kwargs}: {e}") from e
        if not isinstance(sched, (LRScheduler, ReduceLROnPlateau)):
            raise TypeError(f"lr_scheduler={self.factory!r} returned {type(sched).__name__}, not a torch "
                            "LR scheduler")
        return sched


# State of a scheduler that moves as it is stepped; everything else must match the template's.
_VOLATILE = {"base_lrs", "last_epoch", "_step_count", "_is_initial", "_get_lr_called_within_step",
             "_last_lr", "T_cur", "T_i", "best", "cooldown_counter", "num_bad_epochs", "verbose",
             "optimizer"}
_ALIASES = {"min_lr": "default_min_lr", "lr_lambda": "lr_lambdas"}


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors, arrays: compare as lists
        try:
            return torch.as_tensor(a).tolist() == torch.as_tensor(b).tolist()
        except Exception:
            return False


def scheduler_arguments(template: Any) -> dict[str, Any]:
    """The constructor arguments of a scheduler instance, read back from its attributes.

    Raises ``ValueError`` (naming the accepted forms) when an argument cannot be read back, or when
    a scheduler rebuilt from those arguments would differ from the template in any setting.
    """
    cls = type(template)
    name = cls.__name__
    sig = inspect.signature(cls.__init__)
    kwargs: dict[str, Any] = {}
    for p in list(sig.parameters.values())[2:]:  # self, optimizer
        if p.name in ("last_epoch", "verbose") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        attr = p.name if hasattr(template, p.name) else _ALIASES.get(p.name)
        if attr is not None and hasattr(template, attr):
            value = getattr(template, attr)
            if attr == "lr_lambdas":
                if len({id(f) for f in value}) != 1:
                    raise ValueError(f"cannot rebuild {name} with one lr_lambda per parameter group; "
                                     f"{_SCHEDULER_FORMS}")
                value = value[0]
            kwargs[p.name] = value
        elif p.default is inspect.Parameter.empty:
            raise ValueError(f"cannot read {name}'s argument {p.name!r} back from the instance; "
                             f"{_SCHEDULER_FORMS}: e.g. lr_scheduler={name} with lr_scheduler_kwargs="
                             f"{{{p.name!r}: ...}}")
    # Check: the same class built from these arguments on a stand-in optimiser has the same settings.
    opt = getattr(template, "optimizer", None)
    lrs = [g.get("initial_lr", g["lr"]) for g in opt.param_groups] if opt is not None else [1.0]
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs],
                               lr=lrs[0])
    try:
        probe = cls(stand_in, **kwargs)
    except Exception as e:
        raise ValueError(f"cannot rebuild {name} from the instance ({e}); {_SCHEDULER_FORMS}") from e
    want, got = template.state_dict(), probe.state_dict()
    differ = sorted(k for k in set(want) | set(got) if k not in _VOLATILE and not _same(want.get(k),
                                                                                       got.get(k)))
    if differ:
        raise ValueError(f"cannot rebuild {name} faithfully from the instance (settings {differ} are not "
                         f"constructor arguments); {_SCHEDULER_FORMS}")
    return kwargs


class _SchedulerCallback(pl.Callback):
    """Builds the learning-rate scheduler on the run's optimiser at the start of training and steps
    it after each optimiser step (``interval="step"``) or each epoch (``"epoch"``).

    The base learning rate ``lr`` (times each group's ``lr_scale``) is written into the optimiser
    first, so every scheduler starts from the estimator's learning rate. ``ReduceLROnPlateau`` is
    stepped with the logged metric ``monitor``.
    """

    def __init__(self, build: Any, lr: float, interval: str, monitor: str):
        self.build, self.lr, self.interval, self.monitor = build, lr, interval, monitor
        self.scheduler: Any = None
        self._stepped_at = 0
        self._pending_state: dict | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0]
        for g in opt.param_groups:
            g["lr"] = self.lr * g.get("lr_scale", 1.0)
            g.pop("initial_lr", None)
        self._stepped_at = trainer.global_step
        if self.build is None:
            return
        total_steps, per_epoch = pl_module.total_steps(), pl_module.steps_per_epoch()
        if self.interval == "step":
            total, units = total_steps, per_epoch
        else:
            total, units = math.ceil(total_steps / per_epoch), 1
        self.scheduler = self.build(opt, peak=self.lr, total=total, units_per_epoch=units)
        if self._pending_state is not None:
            self.scheduler.load_state_dict(self._pending_state)
            self._pending_state = None

    def _step(self, trainer: pl.Trainer) -> None:
        if isinstance(self.scheduler, ReduceLROnPlateau):
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise ValueError(f"ReduceLROnPlateau monitors {self.monitor!r}, which was not logged; "
                                 f"logged: {sorted(trainer.callback_metrics)} (set lr_scheduler_kwargs"
                                 "['monitor'])")
            self.scheduler.step(float(value))
        else:
            self.scheduler.step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.scheduler is not None and self.interval == "step" and trainer.global_step > self._stepped_at:
            self._stepped_at = trainer.global_step
            self._step(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scheduler is not None and self.interval == "epoch":
            self._step(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict.get("scheduler")


class _EstimatorModule(DINOModule):
    """DINOModule that returns nidl's step dicts, checks the view count and records the mean
    training / validation loss of each epoch. The step itself is DINOModule's (the shared
    :class:`~dinokit.train.step.TrainingStep`, with ``lr_schedule="none"``: the estimator's torch
    scheduler owns the learning rate)."""

    def __init__(self, method: nn.Module, settings: StepSettings, *, n_views: int, **kwargs: Any):
        super().__init__(method, settings, **kwargs)
        self.n_views = n_views
        self.epoch_losses: list[float] = []
        self.val_losses: list[float] = []
        self._sums: dict[str, list] = {"train": [None, 0], "val": [None, 0]}
        self._last_out: Any = None
        self._labels: Any = None

    def _check_views(self, batch: Any) -> None:
        b = unpack_batch(batch, self.n_global)
        found = len(b["global_views"]) + len(b["local_views"])
        if found != self.n_views:
            raise ValueError(
                f"batch has {found} views but num_local_crops={self.n_views - 2} needs "
                f"{self.n_views} (2 global + {self.n_views - 2} local)"
            )
        self._labels = b["labels"]

    def record_step(self, output: Any) -> None:
        self._last_out = output

    def _record(self, split: str, loss: Tensor) -> dict[str, Any]:
        s = self._sums[split]
        s[0] = loss.detach() if s[0] is None else s[0] + loss.detach()  # summed on the device
        s[1] += 1
        out, self._last_out = self._last_out, None
        return {"loss": loss, "z_student": getattr(out, "student_logits", None),
                "z_teacher": getattr(out, "teacher_logits", None), "y": self._labels}

    def _epoch_mean(self, split: str) -> float | None:
        total, count = self._sums[split]
        self._sums[split] = [None, 0]
        return float(total) / count if count else None  # one sync per epoch

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        self._check_views(batch)
        loss = super().training_step(batch, batch_idx)
        return self._record("train", loss)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        self._check_views(batch)
        self._last_out = out = self.forward_batch(batch)
        logits = getattr(out, "student_logits", None)  # [n_views, B, K]; a feature distillation has none
        b = logits.shape[1] if logits is not None else out.embedding.shape[0] // 2
        self.log("val/loss", out.loss, prog_bar=True, batch_size=b, sync_dist=True)
        return self._record("val", out.loss)

    def on_train_epoch_end(self) -> None:
        mean = self._epoch_mean("train")
        if mean is not None:
            self.epoch_losses.append(mean)

    def on_validation_epoch_end(self) -> None:
        mean = self._epoch_mean("val")
        if mean is not None and not self.trainer.sanity_checking:
            self.val_losses.append(mean)


def _trainer_parameter_names() -> list[str]:
    return [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]


class DINOEstimator(TransformerMixin, BaseEstimator):
    """DINO as a scikit-learn transformer: ``fit`` pretrains, ``transform`` returns the teacher
    backbone's features (no projection head).

    After ``fit``: ``encoder_`` (the teacher backbone), ``student``, ``teacher`` (backbones),
    ``student_head``, ``teacher_head``, ``loss`` (the DINO loss), ``optimizer_``, ``lr_scheduler_``
    (what drove the learning rate: the run's :class:`~dinokit.clock.Clock` for ``"warmup_cosine"``,
    whose ``lr(step)`` is the schedule; the torch scheduler for a scheduler class, factory or
    instance; None for ``"none"``), ``method_``,
    ``history_`` / ``val_history_`` (mean training / validation loss per epoch), and the run-time
    handles ``trainer_`` and ``module_``, which are not pickled. Seed 003 names the first of these
    ``encoder``/``optimizer``/``lr_scheduler``, but those are constructor parameters here, which
    scikit-learn requires to stay unchanged (``clone`` relies on it).

    Args:
        encoder: an ``nn.Module`` class (built with ``encoder_kwargs``), an instance (copied at each
            fit), or a timm model name.
        proj_input_dim: encoder output width; inferred when None, checked when given.
        proj_hidden_dim, proj_bottleneck_dim, proj_output_dim, proj_batch_norm, proj_norm_last_layer:
            the DINO head.
        num_local_crops: local views per image (batches hold 2 global + this many local views).
        student_temperature, teacher_temperature, warmup_teacher_temp, warmup_teacher_temp_epochs:
            DINO temperatures.
        base_lambda, final_lambda: teacher EMA momentum, cosine over all steps.
        clip_grad: global gradient-norm clipping (0 = off). freeze_last_layer: epochs with frozen
            prototypes.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamW"``, an optimizer class, or an instance (its class
            and hyper-parameters, lr included, are reused on the method's parameter groups).
        learning_rate, weight_decay, exclude_bias_and_norm_wd, optimizer_kwargs: optimiser settings.
        lr_scheduler: ``"none"``; ``"warmup_cosine"`` (linear warm-up from ``warmup_start_lr`` over
            ``warmup_epochs``, then a cosine to ``min_lr``); a torch scheduler class or a callable
            ``(optimizer, **lr_scheduler_kwargs) -> scheduler``; or a scheduler instance (bound to
            any optimiser: its class and settings are rebuilt on the run's optimiser, from step 0).
        lr_scheduler_kwargs: ``interval`` (``"step"`` or ``"epoch"``: when the scheduler steps;
            with ``"epoch"`` the warm-up cosine counts epochs and holds the lr within each),
            ``monitor`` (metric for ``ReduceLROnPlateau``; ``"val/loss"`` when there is a
            validation loader, else ``"train/loss"``), the ``warmup_cosine`` settings, or the
            arguments of a scheduler class.
        random_state: seed of the weights, crops and data order.
        crop_config: :class:`~dinokit.data.MultiCropConfig` (or dict) for array inputs.
        batch_size: batch size of the loader made from array inputs.
        channels_last: CNN encoders in channels-last memory format (``backbone.channels_last``:
            faster convolutions; ViTs and other modules are unaffected).
        settings: :class:`~dinokit.settings.MethodSettings` for the knobs nidl's estimator does not name
            (head layers, centring, ...); the estimator's own parameters set the rest.
        distill_teacher: distil this frozen teacher into ``encoder`` instead of training it by DINO
            (:class:`~dinokit.Distillation`; ``model.teacher`` of the config): a dinokit run or
            checkpoint, an export, a weights file (``settings.distillation.teacher_backbone``
            names its architecture), a method or a backbone module. ``settings.distillation``
            chooses the objective; ``transform`` then gives the student's features.
        **kwargs: ``lightning.pytorch.Trainer`` arguments (``max_epochs``, ``accelerator``, ...);
            a name that is neither raises at once, naming the closest valid one.
    """

    def __init__(self, encoder: Any, encoder_kwargs: dict | None = None, proj_input_dim: int | None = None,
                 proj_hidden_dim: int = 2048, proj_bottleneck_dim: int = 256, proj_output_dim: int = 4096,
                 proj_batch_norm: bool = True, proj_norm_last_layer: bool = True, num_local_crops: int = 8,
                 student_temperature: float = 0.1, teacher_temperature: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 30,
                 base_lambda: float = 0.996, final_lambda: float = 1.0, clip_grad: float = 0.0,
                 freeze_last_layer: int = 0, optimizer: Any = "adamW", learning_rate: float = 3e-4,
                 weight_decay: float = 5e-4, exclude_bias_and_norm_wd: bool = True,
                 optimizer_kwargs: dict | None = None, lr_scheduler: Any = "warmup_cosine",
                 lr_scheduler_kwargs: dict | None = None, random_state: int | None = None,
                 crop_config: Any = None, batch_size: int = 32, channels_last: bool = True,
                 settings: MethodSettings | None = None, distill_teacher: Any = None, **kwargs: Any):
        self.encoder = encoder
        self.encoder_kwargs = encoder_kwargs
        self.proj_input_dim = proj_input_dim
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_bottleneck_dim = proj_bottleneck_dim
        self.proj_output_dim = proj_output_dim
        self.proj_batch_norm = proj_batch_norm
        self.proj_norm_last_layer = proj_norm_last_layer
        self.num_local_crops = num_local_crops
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.base_lambda = base_lambda
        self.final_lambda = final_lambda
        self.clip_grad = clip_grad
        self.freeze_last_layer = freeze_last_layer
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.exclude_bias_and_norm_wd = exclude_bias_and_norm_wd
        self.optimizer_kwargs = optimizer_kwargs
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_kwargs = lr_scheduler_kwargs
        self.random_state = random_state
        self.crop_config = crop_config
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.settings = settings
        self.distill_teacher = distill_teacher
        self._check_names(kwargs)
        self._trainer_kwargs = dict(kwargs)

    # ------------------------------------------------------------------ scikit-learn protocol
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        params = super().get_params(deep=deep)
        params.update(self._trainer_kwargs)
        return params

    def set_params(self, **params: Any) -> DINOEstimator:
        names = set(self._get_param_names())
        extra = {k: params.pop(k) for k in [k for k in params if k not in names]}
        self._check_names(extra)
        super().set_params(**params)
        self._trainer_kwargs.update(extra)
        return self

    @classmethod
    def _check_names(cls, names: Any) -> None:
        """Unknown parameter names fail now (not at ``fit``), naming the closest valid one."""
        trainer_names = _trainer_parameter_names()
        valid = cls._get_param_names() + trainer_names
        for key in names:
            if key in trainer_names:
                continue
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"invalid parameter {key!r} for DINOEstimator: {hint}Valid parameters are the "
                             f"estimator's {sorted(cls._get_param_names())} and lightning.pytorch.Trainer's "
                             f"{sorted(trainer_names)}")

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "method_")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)
        for handle in ("trainer_", "module_"):  # run-time handles (data loaders, loggers): not pickled
            state.pop(handle, None)
        return state

    # ------------------------------------------------------------------ building
    def _build_encoder(self) -> nn.Module | str:
        enc = self.encoder
        if isinstance(enc, str):
            return enc
        if inspect.isclass(enc) and issubclass(enc, nn.Module):
            return enc(**(self.encoder_kwargs or {}))
        if isinstance(enc, nn.Module):
            return copy.deepcopy(enc)
        raise ValueError(f"encoder must be an nn.Module class, an instance or a timm name, got {enc!r}")

    def _optimizer_spec(self) -> tuple[Any, float, dict]:
        """(DINOModule optimizer spec, base learning rate, optimizer kwargs)."""
        opt, kwargs = self.optimizer, dict(self.optimizer_kwargs or {})
        if isinstance(opt, str):
            if opt not in OPTIMIZERS:
                raise ValueError(f"optimizer must be one of {sorted(set(OPTIMIZERS) - {'adamw'})}, "
                                 f"an optimizer class or instance; got {opt!r}")
            return OPTIMIZERS[opt], self.learning_rate, kwargs
        if isinstance(opt, torch.optim.Optimizer):
            cls = type(opt)
            defaults = {k: v for k, v in opt.defaults.items() if k not in ("lr", "weight_decay")
                        and k in inspect.signature(cls).parameters}
            return _OptimizerFactory(cls, defaults), opt.defaults["lr"], kwargs
        if inspect.isclass(opt) and issubclass(opt, torch.optim.Optimizer):
            return _OptimizerFactory(opt, {"lr": self.learning_rate}), self.learning_rate, kwargs
        raise ValueError("optimizer must be 'sgd', 'adam', 'adamW', an optimizer class or instance; "
                         f"got {opt!r}")

    def _scheduler_spec(self, has_val: bool) -> tuple[Any, str, str]:
        """(scheduler builder, the clock's warm-up cosine settings, or None; interval; monitor)."""
        sch, given = self.lr_scheduler, dict(self.lr_scheduler_kwargs or {})
        interval = given.get("interval", "step")
        if interval not in INTERVALS:
            raise ValueError(f"lr_scheduler_kwargs['interval'] must be one of {INTERVALS}, got {interval!r}")
        monitor = given.get("monitor", "val/loss" if has_val else "train/loss")
        extra = {k: v for k, v in given.items() if k not in STEPPING_KEYS}
        if sch is None or sch == "none":
            return None, interval, monitor
        if sch == "warmup_cosine":
            kw = {**DEFAULT_SCHEDULER_KWARGS, **given}
            unknown = sorted(set(kw) - set(DEFAULT_SCHEDULER_KWARGS) - set(STEPPING_KEYS))
            if unknown:
                raise ValueError(f"lr_scheduler_kwargs {unknown} are not settings of 'warmup_cosine' "
                                 f"(it takes {sorted(DEFAULT_SCHEDULER_KWARGS)})")
            return (OptimSettings(lr_schedule="warmup_cosine", warmup_epochs=kw["warmup_epochs"],
                                  warmup_start_lr=kw["warmup_start_lr"], min_lr=kw["min_lr"]),
                    interval, monitor)
        if isinstance(sch, str):
            raise ValueError(f"lr_scheduler must be one of {list(SCHEDULERS)} or a scheduler; got {sch!r}")
        if isinstance(sch, (LRScheduler, ReduceLROnPlateau)):
            return _UserScheduler(type(sch), {**scheduler_arguments(sch), **extra}), interval, monitor
        if callable(sch):
            return _UserScheduler(sch, extra), interval, monitor
        raise ValueError(f"{_SCHEDULER_FORMS}; got {sch!r}")

    def _method_settings(self) -> MethodSettings:
        """The DINO settings that nidl's names stand for (``proj_output_dim`` is
        ``dino.n_prototypes``, ``base_lambda`` ``teacher.momentum``, ...), on top of ``settings``."""
        s = self.settings if self.settings is not None else MethodSettings()
        if not isinstance(s, MethodSettings):
            raise TypeError(f"settings must be a dinokit.settings.MethodSettings, got {type(s).__name__}")
        kwargs = dict(self.encoder_kwargs or {}) if isinstance(self.encoder, str) else dict(s.backbone.kwargs)
        return dataclasses.replace(
            s,
            backbone=dataclasses.replace(s.backbone, kwargs=kwargs, channels_last=self.channels_last),
            heads=dataclasses.replace(s.heads, hidden_dim=self.proj_hidden_dim,
                                      bottleneck_dim=self.proj_bottleneck_dim,
                                      batch_norm=self.proj_batch_norm,
                                      norm_last_layer=self.proj_norm_last_layer),
            dino=dataclasses.replace(s.dino, n_prototypes=self.proj_output_dim,
                                     student_temperature=self.student_temperature),
            teacher=dataclasses.replace(s.teacher, temperature=self.teacher_temperature,
                                        warmup_temperature=self.warmup_teacher_temp,
                                        warmup_epochs=self.warmup_teacher_temp_epochs,
                                        momentum=self.base_lambda,
                                        final_momentum=self.final_lambda))

    def _views_loader(self, X: Any, shuffle_seed: int) -> DataLoader:
        if isinstance(X, DataLoader):
            return X
        ds = TensorImageDataset(X)
        if getattr(self, "crop_config_", None) is None:
            self.crop_config_ = self._crop_config(ds.images)
        views = SeededViews(ds, MultiCropTransform(self.crop_config_), seed=shuffle_seed)
        if len(views) < self.batch_size:
            raise ValueError(f"batch_size={self.batch_size} is larger than the {len(views)} images given")
        return ResumableDataLoader(views, batch_size=self.batch_size, seed=shuffle_seed,
                                   collate_fn=MultiCropCollate())

    def _crop_config(self, images: Tensor) -> Any:
        if isinstance(self.crop_config, MultiCropConfig):
            return self.crop_config
        if isinstance(self.crop_config, dict):
            return MultiCropConfig.from_dict(self.crop_config)
        x = images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)
        c, h = x.shape[1], x.shape[-1]
        mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
        std = tuple((x.std(dim=(0, 2, 3)) + 1e-3).tolist())
        if h <= 64:
            return MultiCropConfig.small(h, channels=c, n_local=self.num_local_crops, mean=mean, std=std)
        local = max(8, round(h * 96 / 224))
        return MultiCropConfig(global_size=h, local_size=local, n_local=self.num_local_crops,
                               channels=c, mean=mean, std=std)

    # ------------------------------------------------------------------ fit / transform
    def fit(self, X: Any, y: Any = None, val_dataloader: Any = None) -> DINOEstimator:
        """Pretrain on a DataLoader of multi-crop batches, or on an image array ``[N, C, H, W]``.

        Validation (nidl's ``fit(train_dataloader, val_dataloader)``): a DataLoader given as
        the second argument or as ``val_dataloader`` (or an image array as ``val_dataloader``)
        gets the DINO loss computed by Lightning's validation loop; ``val_history_`` holds its
        epoch means. Labels ``y`` (scikit-learn's ``fit(X, y)``) are ignored.
        """
        if isinstance(y, DataLoader):
            if val_dataloader is not None:
                raise ValueError("fit got a validation DataLoader both as y and as val_dataloader")
            y, val_dataloader = None, y
        if self.random_state is not None:
            pl.seed_everything(self.random_state, verbose=False)
        self.crop_config_ = None
        opt_spec, lr, opt_kwargs = self._optimizer_spec()
        build_sched, interval, monitor = self._scheduler_spec(has_val=val_dataloader is not None)
        seed = self.random_state or 0
        loader = self._views_loader(X, seed)
        val_loader = None if val_dataloader is None else self._views_loader(val_dataloader, seed + 1)
        if self.distill_teacher is not None:
            method = Distillation(self.distill_teacher, self._build_encoder(),
                                  settings=self._method_settings())
        else:
            method = DINO(self._build_encoder(), settings=self._method_settings())
        width = method.student_backbone.embed_dim
        if self.proj_input_dim is not None and self.proj_input_dim != width:
            raise ValueError(f"proj_input_dim={self.proj_input_dim} but the encoder outputs {width} features")
        tkw = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
               **self._trainer_kwargs}
        # The shared training step owns accumulation and autocast precision (fit.engine_precision).
        accumulate = int(tkw.pop("accumulate_grad_batches", 1) or 1)
        precision = str(tkw.get("precision", "32-true"))
        if precision in STEP_PRECISIONS:
            tkw["precision"] = "32-true"
        # The clock owns the warm-up cosine; "none" and user schedulers leave the optimiser's lr alone.
        clock_lr = build_sched if isinstance(build_sched, OptimSettings) else None
        optim = dataclasses.replace(
            clock_lr or OptimSettings(lr_schedule="none"), lr=lr, lr_scaling="none",
            weight_decay=self.weight_decay, weight_decay_end=self.weight_decay, clip_grad=self.clip_grad,
            clip_mode="global", freeze_last_layer_epochs=self.freeze_last_layer)
        settings = StepSettings(optim=optim,
                                precision=precision if precision in STEP_PRECISIONS else "32-true",
                                accumulate=accumulate)
        module = _EstimatorModule(
            method, settings, n_views=2 + self.num_local_crops, optimizer=opt_spec,
            optimizer_kwargs=opt_kwargs,
            exclude_bias_and_norm_wd=self.exclude_bias_and_norm_wd, lr_interval=interval,
        )
        scheduler_cb = _SchedulerCallback(None if clock_lr else build_sched, lr, interval, monitor)
        tkw["callbacks"] = [*(tkw.get("callbacks") or []), scheduler_cb]
        if not isinstance(X, DataLoader):
            tkw.setdefault("use_distributed_sampler", False)
        with quiet_lightning((*LIGHTNING_NOISE, NO_VAL_LOADER)):
            trainer = pl.Trainer(**tkw)
            trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader)
        self.method_, self.trainer_, self.module_ = method, trainer, module
        self.history_ = list(module.epoch_losses)
        self.val_history_ = list(module.val_losses)
        self.encoder_ = method.deployed_backbone
        self.student, self.teacher = method.student_backbone, method.teacher_backbone
        self.student_head = getattr(method.student, "head", None)  # a feature distillation has none
        self.teacher_head = getattr(method.teacher, "head", None)
        self.loss = getattr(method, "dino_loss", None)
        self.optimizer_ = trainer.optimizers[0] if trainer.optimizers else None
        self.lr_scheduler_ = module.step_fn.clock if clock_lr is not None else scheduler_cb.scheduler
        return self

    def transform_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Tensor:
        """Seed 003: encode one batch into the latent space, the delivered backbone's features
        ``[B, D]`` (DINO's teacher, a distillation's student; no projection head). ``batch`` is
        an image tensor, or ``(images, ...)``; the indices are ignored."""
        if not self.__sklearn_is_fitted__():
            raise NotFittedError("This DINOEstimator instance is not fitted yet; call fit first")
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(x, Tensor):
            raise TypeError("transform_step expects an image tensor or (images, ...), "
                            f"got {type(x).__name__}")
        backbone = self.method_.deployed_backbone
        was_training = backbone.training
        backbone.eval()
        try:
            return self.method_.embed(x.to(next(backbone.parameters()).device))
        finally:
            backbone.train(was_training)

    def transform(self, X: Any) -> Tensor | np.ndarray:
        """Features of the delivered backbone (DINO's teacher, a distillation's student) ``[N, D]``: a
        numpy array for array input, a tensor for a loader."""
        if not self.__sklearn_is_fitted__():
            raise NotFittedError("This DINOEstimator instance is not fitted yet; call fit first")
        if isinstance(X, DataLoader):
            return extract_features(self.method_, X, progress=False)[0]
        cfg = getattr(self, "crop_config_", None)
        if cfg is None:
            raise ValueError("transform(array) needs a model fitted on arrays (or pass a DataLoader)")
        tf = EvalTransform(cfg.global_size, cfg.global_size, tuple(cfg.mean), tuple(cfg.std), cfg.channels)
        ds = TensorImageDataset(X, transform=tf)
        feats, _ = extract_features(self.method_, DataLoader(ds, batch_size=256), progress=False)
        return feats.numpy()
