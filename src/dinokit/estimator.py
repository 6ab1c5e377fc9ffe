"""A scikit-learn-style DINO estimator (``fit`` / ``transform``) over the Lightning engine.

The surface and defaults follow nidl's DINO estimator (seed 003); underneath it composes
:class:`~dinokit.DINO` and :class:`~dinokit.train.DINOModule` — no second implementation of the
algorithm. Extra keyword arguments go to ``lightning.pytorch.Trainer`` and survive
``get_params`` / ``set_params`` / ``sklearn.base.clone``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dinokit.train.module import DINOModule, unpack_batch

OPTIMIZERS = {"sgd": "sgd", "adam": "adam", "adamW": "adamw", "adamw": "adamw"}
SCHEDULERS = ("none", "warmup_cosine")
DEFAULT_SCHEDULER_KWARGS = {"warmup_epochs": 10, "warmup_start_lr": 1e-6, "min_lr": 0.0, "interval": "step"}


class _EstimatorModule(DINOModule):
    """DINOModule returning seed 003's step dicts, checking the view count, recording epoch
    losses, and optionally driving a user LR scheduler."""

    def __init__(self, method: nn.Module, *, n_views: int, user_scheduler: Any = None,
                 scheduler_interval: str = "step", **kwargs: Any):
        super().__init__(method, **kwargs)
        self.n_views, self.user_scheduler = n_views, user_scheduler
        self.scheduler_interval = scheduler_interval
        self.epoch_losses: list[float] = []
        self._sum = None
        self._count = 0
        self.built_scheduler: Any = None

    def _check(self, batch: Any) -> dict[str, Any]:
        b = unpack_batch(batch, self.n_global)
        found = len(b["global_views"]) + len(b["local_views"])
        if found != self.n_views:
            raise ValueError(
                f"batch has {found} views but num_local_crops={self.n_views - 2} needs "
                f"{self.n_views} (2 global + {self.n_views - 2} local)"
            )
        return b

    def _step(self, batch: Any) -> dict[str, Any]:
        b = self._check(batch)
        out = self.method(global_views=b["global_views"], local_views=b["local_views"])
        return {"loss": out.loss, "z_student": out.student_logits, "z_teacher": out.teacher_logits,
                "y": b["labels"], "out": out}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        self._apply_schedules()
        r = self._step(batch)
        loss = r.pop("out").loss
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=r["z_teacher"].shape[1])
        self._sum = loss.detach() if self._sum is None else self._sum + loss.detach()
        self._count += 1
        return r

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        r = self._step(batch)
        r.pop("out")
        self.log("val/loss", r["loss"], batch_size=r["z_teacher"].shape[1])
        return r

    def on_train_epoch_end(self) -> None:
        if self._count:
            self.epoch_losses.append(float(self._sum) / self._count)  # one sync per epoch
        self._sum, self._count = None, 0

    def _apply_schedules(self) -> None:
        if self.user_scheduler is None:
            super()._apply_schedules()

    def configure_optimizers(self) -> Any:
        opt = super().configure_optimizers()
        if self.user_scheduler is None:
            return opt
        for g in opt.param_groups:
            g["lr"] = self.lr * g.get("lr_scale", 1.0)
            g.setdefault("initial_lr", g["lr"])
        sched = self.user_scheduler(opt)
        self.built_scheduler = sched
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler_interval}}


class DINOEstimator(TransformerMixin, BaseEstimator):
    """DINO as a scikit-learn transformer: ``fit`` pretrains, ``transform`` returns the teacher
    backbone's features (no projection head).

    After ``fit``: ``encoder_`` (the teacher backbone), ``student``, ``teacher`` (backbones),
    ``student_head``, ``teacher_head``, ``loss`` (the DINO loss), ``optimizer_``, ``lr_scheduler_``
    (a user scheduler, else None: the built-in schedules are set per step), ``method_``,
    ``trainer_`` and ``history_`` (mean training loss per epoch). Seed 003 names the first of these
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
        lr_scheduler: ``"none"``, ``"warmup_cosine"`` (per step: warm-up from ``warmup_start_lr``
            over ``warmup_epochs``, cosine to ``min_lr``), or a callable ``optimizer -> scheduler``
            (e.g. a scheduler class with ``lr_scheduler_kwargs``), stepped per ``interval``.
        random_state: seed of the weights, crops and data order.
        crop_config: :class:`~dinokit.data.MultiCropConfig` (or dict) for array inputs.
        batch_size: batch size of the loader made from array inputs.
        **kwargs: passed to ``lightning.pytorch.Trainer`` (``max_epochs``, ``accelerator``, ...).
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
                 crop_config: Any = None, batch_size: int = 32, **kwargs: Any):
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
        self._trainer_kwargs = dict(kwargs)

    # ------------------------------------------------------------------ scikit-learn protocol
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        params = super().get_params(deep=deep)
        params.update(self._trainer_kwargs)
        return params

    def set_params(self, **params: Any) -> DINOEstimator:
        names = set(self._get_param_names())
        for key in [k for k in params if k not in names]:
            self._trainer_kwargs[key] = params.pop(key)
        return super().set_params(**params)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "method_")

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
        opt, kwargs = self.optimizer, dict(self.optimizer_kwargs or {})
        if isinstance(opt, str):
            if opt not in OPTIMIZERS:
                raise ValueError(f"optimizer must be one of {sorted(set(OPTIMIZERS) - {'adamw'})}, "
                                 f"an optimizer class or instance; got {opt!r}")
            return OPTIMIZERS[opt], self.learning_rate, kwargs
        if isinstance(opt, torch.optim.Optimizer):
            defaults = {k: v for k, v in opt.defaults.items() if k not in ("lr", "weight_decay")
                        and k in inspect.signature(type(opt)).parameters}
            cls = type(opt)

            def rebuilt(groups: list, **kw: Any) -> torch.optim.Optimizer:
                return cls(groups, lr=0.0, **{**defaults, **kw})

            return rebuilt, opt.defaults["lr"], kwargs
        if inspect.isclass(opt) and issubclass(opt, torch.optim.Optimizer):
            return (lambda groups, **kw: opt(groups, lr=self.learning_rate, **kw)), self.learning_rate, kwargs
        raise ValueError("optimizer must be 'sgd', 'adam', 'adamW', an optimizer class or instance; "
                         f"got {opt!r}")

    def _scheduler_spec(self) -> tuple[str, Callable | None, dict]:
        sch = self.lr_scheduler
        kw = {**DEFAULT_SCHEDULER_KWARGS, **(self.lr_scheduler_kwargs or {})}
        if sch is None or sch == "none":
            return "constant", None, kw
        if sch == "warmup_cosine":
            return "warmup_cosine", None, kw
        if isinstance(sch, str):
            raise ValueError(f"lr_scheduler must be one of {list(SCHEDULERS)} or a scheduler; got {sch!r}")
        if callable(sch):
            extra = {k: v for k, v in (self.lr_scheduler_kwargs or {}).items() if k != "interval"}
            return "constant", (lambda opt: sch(opt, **extra)), kw
        raise ValueError(f"lr_scheduler must be 'none', 'warmup_cosine' or a scheduler; got {sch!r}")

    def _train_loader(self, X: Any) -> DataLoader:
        if isinstance(X, DataLoader):
            return X
        from dinokit.data import MultiCropCollate, MultiCropTransform, TensorImageDataset
        from dinokit.train.loader import ResumableDataLoader, SeededViews

        ds = TensorImageDataset(X)
        self.crop_config_ = self._crop_config(ds.images)
        views = SeededViews(ds, MultiCropTransform(self.crop_config_), seed=self.random_state or 0)
        if len(views) < self.batch_size:
            raise ValueError(f"batch_size={self.batch_size} is larger than the {len(views)} images given")
        return ResumableDataLoader(views, batch_size=self.batch_size, seed=self.random_state or 0,
                                   collate_fn=MultiCropCollate())

    def _crop_config(self, images: Tensor) -> Any:
        from dinokit.data import MultiCropConfig

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
    def fit(self, X: Any, y: Any = None, val_dataloader: DataLoader | None = None) -> DINOEstimator:
        """Pretrain on a DataLoader of multi-crop batches, or on an image array ``[N, C, H, W]``."""
        import lightning.pytorch as pl

        from dinokit.methods.dino import DINO

        if self.random_state is not None:
            pl.seed_everything(self.random_state, verbose=False)
        opt_spec, lr, opt_kwargs = self._optimizer_spec()
        kind, user_sched, sched_kw = self._scheduler_spec()
        loader = self._train_loader(X)
        method = DINO(
            self._build_encoder(), projector_hidden_dim=self.proj_hidden_dim,
            projector_bottleneck_dim=self.proj_bottleneck_dim, n_prototypes=self.proj_output_dim,
            temperature_student=self.student_temperature, temperature_teacher_warmup=self.warmup_teacher_temp,
            temperature_teacher=self.teacher_temperature,
            warmup_epochs_temperature_teacher=self.warmup_teacher_temp_epochs,
            ema_decay_start=self.base_lambda, ema_decay_end=self.final_lambda,
            encoder_kwargs=self.encoder_kwargs if isinstance(self.encoder, str) else None,
            norm_last_layer=self.proj_norm_last_layer, projector_batch_norm=self.proj_batch_norm,
        )
        width = method.student_backbone.embed_dim
        if self.proj_input_dim is not None and self.proj_input_dim != width:
            raise ValueError(f"proj_input_dim={self.proj_input_dim} but the encoder outputs {width} features")
        module = _EstimatorModule(
            method, n_views=2 + self.num_local_crops, user_scheduler=user_sched,
            scheduler_interval=sched_kw.get("interval", "step"), optimizer=opt_spec, lr=lr,
            lr_scaling="none", lr_schedule=kind, min_lr=sched_kw["min_lr"],
            warmup_epochs=sched_kw["warmup_epochs"], warmup_start_lr=sched_kw["warmup_start_lr"],
            weight_decay=self.weight_decay, weight_decay_end=self.weight_decay,
            clip_grad=self.clip_grad, clip_mode="global", freeze_last_layer_epochs=self.freeze_last_layer,
            exclude_bias_and_norm_wd=self.exclude_bias_and_norm_wd, optimizer_kwargs=opt_kwargs,
        )
        tkw = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
               **self._trainer_kwargs}
        if not isinstance(X, DataLoader):
            tkw.setdefault("use_distributed_sampler", False)
        trainer = pl.Trainer(**tkw)
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_dataloader)
        self.method_, self.trainer_, self.module_ = method, trainer, module
        self.history_ = list(module.epoch_losses)
        self.encoder_ = method.teacher_backbone
        self.student, self.teacher = method.student_backbone, method.teacher_backbone
        self.student_head, self.teacher_head = method.student_head, method.teacher_head
        self.loss = method.dino_loss
        self.optimizer_ = trainer.optimizers[0] if trainer.optimizers else None
        self.lr_scheduler_ = module.built_scheduler
        return self

    def transform(self, X: Any) -> Tensor | np.ndarray:
        """Teacher backbone features ``[N, D]``: a numpy array for array input, a tensor for a loader."""
        if not self.__sklearn_is_fitted__():
            raise NotFittedError("This DINOEstimator instance is not fitted yet; call fit first")
        from dinokit.eval.features import extract_features

        if isinstance(X, DataLoader):
            return extract_features(self.method_, X, progress=False)[0]
        from dinokit.data import EvalTransform, TensorImageDataset

        cfg = getattr(self, "crop_config_", None)
        if cfg is None:
            raise ValueError("transform(array) needs a model fitted on arrays (or pass a DataLoader)")
        tf = EvalTransform(cfg.global_size, cfg.global_size, tuple(cfg.mean), tuple(cfg.std), cfg.channels)
        ds = TensorImageDataset(X, transform=tf)
        feats, _ = extract_features(self.method_, DataLoader(ds, batch_size=256), progress=False)
        return feats.numpy()
