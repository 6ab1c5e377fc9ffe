"""``fit(config)``: one pretraining run in its own directory, on Lightning.

A run directory holds ``config.yaml`` (the resolved config), ``checkpoints/`` (``last.ckpt``,
the latest epochs, and the latest step checkpoint), ``logs/metrics.csv``, ``tb/`` (TensorBoard)
and ``pictures/curves.png``. ``trainer.resume`` continues a run exactly: weights, optimiser,
schedules, centre, EMA teacher, loss scaler, RNG and data position.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from dinokit.config import Config, ConfigError
from dinokit.train.build import build_method, build_module, build_train_loader

#: Config keys that may change when resuming; any other change breaks exact continuation.
RESUMABLE_CHANGES = {
    "trainer.epochs", "trainer.max_steps", "trainer.resume", "trainer.progress",
    "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps", "trainer.knn_every_n_epochs",
    "trainer.output_dir", "trainer.run_name", "trainer.accelerator", "trainer.devices",
    "trainer.num_nodes", "trainer.strategy", "trainer.precision", "trainer.compile",
    "data.num_workers", "data.strict_images", "data.val_path", "data.val_limit",
}


@dataclass
class FitResult:
    """What a run produced."""

    run_dir: Path
    last_checkpoint: Path | None
    method: torch.nn.Module
    module: pl.LightningModule
    trainer: pl.Trainer


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("backbone_kwargs",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def resolve_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """The run directory and, when resuming, the checkpoint to resume from."""
    t = cfg.trainer
    if t.resume:
        if t.resume == "last":
            if not t.run_name:
                raise ConfigError("trainer.resume=last needs trainer.run_name (the run to continue)")
            run_dir = Path(t.output_dir) / t.run_name
            ckpt = run_dir / "checkpoints" / "last.ckpt"
        else:
            ckpt = Path(t.resume)
            run_dir = ckpt.parent.parent
        if not ckpt.is_file():
            raise ConfigError(f"trainer.resume: checkpoint {str(ckpt)!r} does not exist")
        return run_dir, ckpt
    name = t.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.method}"
    return Path(t.output_dir) / name, None


def check_resume_compatible(ckpt: Path, cfg: Config) -> None:
    """Fail before training when the checkpoint's run used an incompatible config."""
    obj = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    old = (obj.get("dinokit") or {}).get("config")
    if not old:
        raise ConfigError(f"trainer.resume: {ckpt} is not a dinokit training checkpoint")
    all_changes = config_changes(old, cfg.to_dict())
    if {"trainer.epochs", "trainer.max_steps"} & set(all_changes):
        warnings.warn("trainer.epochs/max_steps changed on resume: the lr, weight-decay and momentum "
                      "schedules are stretched to the new length", stacklevel=2)
    changed = [k for k in all_changes if k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"trainer.resume: the config differs from the run's in keys that break exact "
            f"continuation: {changed}; start a new run instead, or restore those values"
        )


def _callbacks(cfg: Config, run_dir: Path) -> list[pl.Callback]:
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    ckpt_dir = run_dir / "checkpoints"
    cbs: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=ckpt_dir, filename="epoch{epoch:03d}", monitor="epoch", mode="max",
            save_top_k=3, save_last=True, every_n_epochs=1, auto_insert_metric_name=False,
        )
    ]
    if cfg.trainer.checkpoint_every_n_steps:
        cbs.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="step{step:07d}", monitor="step", mode="max",
                save_top_k=1, every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
                auto_insert_metric_name=False, save_last=True,
            )
        )
    if cfg.trainer.progress:
        cbs.append(TQDMProgressBar(refresh_rate=1))
    knn = _knn_monitor(cfg)
    if knn is not None:
        cbs.append(knn)
    return cbs


def _knn_monitor(cfg: Config) -> pl.Callback | None:
    if cfg.trainer.knn_every_n_epochs <= 0:
        return None
    from dinokit.data import EvalTransform
    from dinokit.eval.monitor import KNNMonitor
    from dinokit.train.build import build_dataset, build_multicrop_config

    tf = EvalTransform.for_config(build_multicrop_config(cfg))
    train = build_dataset(cfg, "train", transform=tf)
    if cfg.data.dataset == "folder" and not cfg.data.val_path:
        raise ConfigError("trainer.knn_every_n_epochs needs data.val_path (labelled images)")
    val = build_dataset(cfg, "val", transform=tf)
    loader = dict(batch_size=256, num_workers=cfg.data.num_workers)
    return KNNMonitor(
        torch.utils.data.DataLoader(train, **loader),
        torch.utils.data.DataLoader(val, **loader),
        every_n_epochs=cfg.trainer.knn_every_n_epochs,
    )


def build_trainer(cfg: Config, run_dir: Path, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    """The Lightning Trainer for ``cfg.trainer`` logging to ``run_dir``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg.trainer
    devices: Any = t.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    loggers = [CSVLogger(str(run_dir), name="logs", version="")]
    try:
        loggers.append(TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False))
    except ModuleNotFoundError:  # pragma: no cover - tensorboard is a dependency
        warnings.warn("tensorboard is not installed: logging to CSV only", stacklevel=2)
    return pl.Trainer(
        default_root_dir=str(run_dir),
        max_epochs=t.epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        logger=loggers,
        callbacks=callbacks if callbacks is not None else _callbacks(cfg, run_dir),
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the EpochSampler shards itself (exact resume)
        num_sanity_val_steps=0,
    )


def fit(cfg: Config) -> FitResult:
    """Train ``cfg`` end to end; returns the run directory, last checkpoint and trained method."""
    cfg.validate()
    run_dir, ckpt = resolve_run_dir(cfg)
    if ckpt is not None:
        check_resume_compatible(ckpt, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        _keep_previous_metrics(run_dir)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    method = build_method(cfg)
    loader = build_train_loader(cfg, method)
    module = build_module(cfg, method)
    if cfg.trainer.compile:
        method.student_backbone.compile()
    trainer = build_trainer(cfg, run_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(ckpt) if ckpt else None,
                    weights_only=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    _report_skipped(loader.dataset)
    if trainer.is_global_zero:
        _write_curves(run_dir, cfg.model.n_prototypes)
    return FitResult(run_dir, last if last.is_file() else None, method, module, trainer)


def _report_skipped(dataset: object) -> None:
    """The count of unreadable images skipped during the run (each was named when skipped)."""
    inner = getattr(dataset, "dataset", dataset)
    inner = getattr(inner, "dataset", inner)  # SeededViews -> Subset -> ImageFolderDataset
    skipped = getattr(inner, "skipped", None)
    if skipped:
        warnings.warn(f"{len(skipped)} unreadable image(s) were skipped: {inner.summary()}", stacklevel=2)


def _keep_previous_metrics(run_dir: Path) -> None:
    """Lightning's CSV logger deletes metrics.csv when a run resumes: keep it as a numbered part
    (``read_metrics`` stitches the parts back together)."""
    current = run_dir / "logs" / "metrics.csv"
    if current.is_file():
        n = len(list(current.parent.glob("metrics.part*.csv")))
        current.rename(current.parent / f"metrics.part{n:03d}.csv")


def _write_curves(run_dir: Path, n_prototypes: int) -> None:
    try:
        from dinokit.viz.curves import plot_training_curves
    except ImportError:  # pragma: no cover - while viz is being built
        return
    try:
        plot_training_curves(run_dir, run_dir / "pictures" / "curves.png", n_prototypes)
    except (ValueError, FileNotFoundError) as e:
        warnings.warn(f"training curves not drawn: {e}", stacklevel=2)


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config saved in a run directory."""
    from dinokit.config import from_dict

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a dinokit run directory (no config.yaml)")
    return from_dict(yaml.safe_load(path.read_text()))
