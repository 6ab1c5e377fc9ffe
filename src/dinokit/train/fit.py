"""``fit(config)``: one pretraining run in its own directory, on Lightning.

A run directory holds ``config.yaml`` (the resolved config), ``checkpoints/`` (``last.ckpt``,
the latest epochs, and the newest ``trainer.keep_checkpoints`` step checkpoints),
``logs/metrics.csv``, ``tb/`` (TensorBoard), ``pictures/curves.png`` (and ``pictures/pca.png`` for
backbones with a patch grid), and while it trains
``train.lock`` (:mod:`dinokit.train.run_lock`). ``trainer.resume`` continues a run exactly:
weights, optimiser, schedules, centre, EMA teacher, loss scaler, RNG and data position.

When things go wrong (see the README): checkpoints are written atomically
(:mod:`dinokit.train.checkpoint_io`) and never with non-finite weights; ``last.ckpt`` is always
the newest state; SIGTERM/SIGUSR1/SIGINT checkpoint and stop, also when sent to the whole
process group (:mod:`dinokit.train.preemption`); ``trainer.resume=auto`` picks the newest
checkpoint that loads with finite weights, skipping damaged ones with a warning and stopping at
one it cannot read; a collapsed teacher is reported and the non-finite guard's stop checkpoints
the last finite state (:mod:`dinokit.train.guards`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from dinokit import atomic
from dinokit.config import Config, ConfigError, from_dict, upgrade_saved
from dinokit.data import EvalTransform
from dinokit.eval.monitor import KNNMonitor
from dinokit.train.build import (
    build_dataset,
    build_method,
    build_module,
    build_multicrop_config,
    build_preprocessing,
    build_train_loader,
    check_devices,
    planned_world_size,
    resolved_precision,
    with_band_statistics,
)
from dinokit.train.checkpoint_io import (
    CheckpointReadError,
    CheckpointUnreadableError,
    SafeCheckpointIO,
    atomic_save,
    newest_good_checkpoint,
    remove_stale_temp_files,
    run_checkpoints,
    verify_checkpoint,
)
from dinokit.train.fsdp import FSDP2Strategy
from dinokit.train.guards import CollapseGuard, NonFiniteStopCheckpoint
from dinokit.train.module import check_external_networks
from dinokit.train.preemption import Preempted, PreemptionCallback
from dinokit.train.quiet import FIT_NOISE, LIGHTNING_NOISE, quiet_lightning
from dinokit.train.run_lock import RunLock
from dinokit.train.step import STEP_PRECISIONS
from dinokit.train.strategy import prepare_for_strategy, with_launcher_env
from dinokit.viz.curves import plot_training_curves
from dinokit.weights import check_checkpoint_fits, gives_heads
from dinokit.worker_signals import IgnoreStopSignals

#: Config keys that may change when resuming; any other change breaks exact continuation.
RESUMABLE_CHANGES = {
    "trainer.epochs", "trainer.max_steps", "trainer.resume", "trainer.progress",
    "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps", "trainer.keep_checkpoints",
    "trainer.knn_every_n_epochs",
    "trainer.output_dir", "trainer.run_name", "trainer.accelerator", "trainer.devices",
    "trainer.num_nodes", "trainer.strategy", "trainer.precision", "trainer.compile",
    "data.num_workers", "data.strict_images", "data.max_image_pixels", "data.val_path", "data.val_limit",
    "trainer.stop_on_collapse", "trainer.collapse_window", "trainer.slurm_requeue",
    # the teacher's file may move: a checkpoint without the teacher checks its fingerprint instead
    "model.teacher", "distillation.checkpoint_teacher",
}


@dataclass
class FitResult:
    """What a run produced."""

    run_dir: Path
    last_checkpoint: Path | None
    method: torch.nn.Module
    module: pl.LightningModule
    trainer: pl.Trainer
    #: one line on teacher collapse for the final summary (see :class:`CollapseGuard`)
    collapse: str = ""
    #: unreadable images skipped during the run (counted over all loader workers)
    skipped_images: int = 0
    #: damaged shards whose rest was skipped (data.dataset=shards, over all loader workers)
    damaged_shards: list[str] = field(default_factory=list)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("backbone.kwargs",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def run_directory(cfg: Config) -> Path:
    """The run directory of ``cfg``: ``output_dir/run_name`` (a timestamp and the method when
    ``run_name`` is unset), or for ``trainer.resume=<path>`` the run holding that checkpoint."""
    t = cfg.trainer
    if t.resume in ("auto", "last"):
        if not t.run_name:
            raise ConfigError(f"trainer.resume={t.resume} needs trainer.run_name (the run to continue)")
        return Path(t.output_dir) / t.run_name
    if t.resume:
        ckpt = Path(t.resume)
        if not ckpt.is_file():
            raise ConfigError(f"trainer.resume: checkpoint {str(ckpt)!r} does not exist")
        return ckpt.parent.parent
    name = t.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.method}"
    return Path(t.output_dir) / name


def resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: start fresh).

    ``trainer.resume``: ``auto`` continues from the newest good checkpoint of
    ``output_dir/run_name`` or starts fresh when there is none (so a job can be resubmitted
    blindly); ``last`` is the same but requires a checkpoint; a path resumes from that file, which
    must load with finite weights. "Good" means it loads with ``weights_only=True`` and every
    weight is finite: a damaged newer file is skipped with a warning naming it. A newer file that
    cannot be read at all (permissions, I/O error) is not damaged: the run stops, naming it,
    rather than continue from an older state or start fresh and overwrite it.
    """
    t = cfg.trainer
    if t.resume in ("auto", "last"):
        remove_stale_temp_files(run_dir / "checkpoints")
        try:
            ckpt, skipped = newest_good_checkpoint(run_checkpoints(run_dir))
        except CheckpointUnreadableError as e:
            raise ConfigError(f"trainer.resume={t.resume}: checkpoint {e}; it may hold the run's newest "
                              "state, so the run neither skips it nor starts over: make it readable "
                              "(or move it out of the run directory) and run again") from None
        for line in skipped:
            warnings.warn(f"trainer.resume: skipping damaged checkpoint: {line}", stacklevel=2)
        if ckpt is None and t.resume == "last":
            last = run_dir / "checkpoints" / "last.ckpt"
            why = (f"all {len(skipped)} checkpoint(s) there are damaged" if skipped
                   else f"checkpoint {str(last)!r} does not exist")
            raise ConfigError(f"trainer.resume=last: no usable checkpoint in {last.parent}: {why} "
                              "(trainer.resume=auto starts fresh instead)")
        return ckpt
    if t.resume:
        try:
            verify_checkpoint(t.resume)
        except CheckpointReadError as e:
            raise ConfigError(f"trainer.resume: {e}") from None
        return Path(t.resume)
    return None


def resolve_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """The run directory and, when resuming, the checkpoint to resume from (see
    :func:`run_directory` and :func:`resume_checkpoint`)."""
    run_dir = run_directory(cfg)
    return run_dir, resume_checkpoint(cfg, run_dir)


def _records_global_batch(obj: dict[str, Any]) -> bool:
    """Whether the checkpoint's loader state records its global batch (``data.batch_size`` x
    processes), which :meth:`~dinokit.train.loader.ResumableDataLoader.load_state_dict` checks:
    ``data.batch_size`` may then change with the world size."""
    try:
        states = obj["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    except (KeyError, TypeError):
        return False
    return bool(states) and all(isinstance(s, dict) and {"world", "batch_size"} <= set(s) for s in states)


def check_resume_compatible(ckpt: Path, cfg: Config) -> None:
    """Fail before training when the checkpoint's run used an incompatible config."""
    obj = torch.load(str(ckpt), map_location="cpu", weights_only=True, mmap=True)
    old = upgrade_saved((obj.get("dinokit") or {}).get("config"))
    if not old:
        raise ConfigError(f"trainer.resume: {ckpt} is not a dinokit training checkpoint")
    all_changes = config_changes(old, cfg.to_dict())
    if {"trainer.epochs", "trainer.max_steps"} & set(all_changes):
        warnings.warn("trainer.epochs/max_steps changed on resume: the lr, weight-decay and momentum "
                      "schedules are stretched to the new length", stacklevel=2)
    changed = [k for k in all_changes if k not in RESUMABLE_CHANGES]
    if "data.batch_size" in changed and _records_global_batch(obj):
        changed.remove("data.batch_size")  # another world size: the loader checks the global batch
    if changed:
        raise ConfigError(
            f"trainer.resume: the config differs from the run's in keys that break exact "
            f"continuation: {changed}; start a new run instead, or restore those values"
        )


def _cut_short(trainer: pl.Trainer) -> bool:
    """Whether training stops on ``max_steps`` before the end of the current epoch."""
    return (0 < trainer.max_steps <= trainer.global_step
            and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except after an epoch cut short by ``trainer.max_steps``: a
    checkpoint taken at that epoch's end (or at the end of training) would record the epoch as
    finished, and a resume with a larger ``max_steps`` would skip the rest of it.
    :class:`FinalStepCheckpoint` saves the mid-epoch state instead."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _cut_short(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _cut_short(trainer):
            super().on_train_end(trainer, pl_module)


class FinalStepCheckpoint(pl.Callback):
    """Writes ``last.ckpt`` after the step that reaches ``trainer.max_steps`` mid-epoch, as a
    mid-epoch checkpoint: resuming with a larger ``max_steps`` continues exactly there."""

    def __init__(self, last_path: str | Path):
        self.last_path = Path(last_path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if _cut_short(trainer):
            # Lightning's weights_only here means "no optimiser state": we save a resumable one.
            trainer.save_checkpoint(str(self.last_path), weights_only=False)


def _callbacks(cfg: Config, run_dir: Path) -> list[pl.Callback]:
    ckpt_dir = run_dir / "checkpoints"
    # Both checkpoint callbacks write the same last.ckpt (no "-v1" copies): whichever saves later
    # in a step wrote the newer state, so last.ckpt is always the last state.
    cbs: list[pl.Callback] = [
        RunCheckpoint(
            dirpath=ckpt_dir, filename="epoch{epoch:03d}", monitor="epoch", mode="max",
            save_top_k=3, save_last=True, every_n_epochs=1, auto_insert_metric_name=False,
            enable_version_counter=False,
        )
    ]
    if cfg.trainer.checkpoint_every_n_steps:
        cbs.append(
            RunCheckpoint(
                dirpath=ckpt_dir, filename="step{step:07d}", monitor="step", mode="max",
                save_top_k=cfg.trainer.keep_checkpoints,
                every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
                auto_insert_metric_name=False, save_last=True, enable_version_counter=False,
            )
        )
    cbs.append(FinalStepCheckpoint(ckpt_dir / "last.ckpt"))
    cbs.append(NonFiniteStopCheckpoint(ckpt_dir / "last.ckpt"))
    cbs.append(PreemptionCallback(ckpt_dir / "last.ckpt", requeue=cfg.trainer.slurm_requeue,
                                  sync_every_n_steps=cfg.trainer.log_every_n_steps))
    cbs.append(CollapseGuard(cfg.dino.n_prototypes, window=cfg.trainer.collapse_window,
                             stop=cfg.trainer.stop_on_collapse,
                             every_n_steps=cfg.trainer.log_every_n_steps))
    if cfg.trainer.progress:
        cbs.append(TQDMProgressBar(refresh_rate=1))
    knn = _knn_monitor(cfg)
    if knn is not None:
        cbs.append(knn)
    return cbs


def _knn_monitor(cfg: Config) -> pl.Callback | None:
    if cfg.trainer.knn_every_n_epochs <= 0:
        return None
    tf = EvalTransform.for_config(build_multicrop_config(cfg))
    train = build_dataset(cfg, "train", transform=tf)
    if cfg.data.dataset in ("folder", "multiband") and not cfg.data.val_path:
        raise ConfigError("trainer.knn_every_n_epochs needs data.val_path (labelled images)")
    val = build_dataset(cfg, "val", transform=tf)
    loader = dict(batch_size=256, num_workers=cfg.data.num_workers,
                  worker_init_fn=IgnoreStopSignals())  # the main process handles SIGTERM/SIGINT
    return KNNMonitor(
        torch.utils.data.DataLoader(train, **loader),
        torch.utils.data.DataLoader(val, **loader),
        every_n_epochs=cfg.trainer.knn_every_n_epochs,
    )


def fsdp_strategy(cfg: Config) -> Any:
    """``trainer.strategy=fsdp``: FSDP2 (``fully_shard`` of student and teacher, see
    :func:`~dinokit.train.strategy.shard_method`) through :class:`~dinokit.train.fsdp.FSDP2Strategy`
    on a 1-D data-parallel mesh; checkpoints hold full tensors, so a run resumes at any world size
    and with any strategy."""
    if cfg.trainer.strategy != "fsdp":
        raise ConfigError(f"trainer.strategy: {cfg.trainer.strategy!r} is not supported; 'fsdp' is FSDP2 "
                          "(fully_shard of student and teacher, full-tensor checkpoints)")
    return FSDP2Strategy(planned_world_size(cfg))


def engine_precision(precision: str) -> str:
    """What Lightning is given for ``trainer.precision``: whole-model dtypes (``64``, ``*-true``)
    stay Lightning's; autocast precisions (``bf16-mixed``, ``16-mixed``) belong to the training
    step (:data:`~dinokit.train.step.STEP_PRECISIONS`), so Lightning runs ``32-true``."""
    return "32-true" if precision in STEP_PRECISIONS else precision


def build_trainer(cfg: Config, run_dir: Path, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    """The Lightning Trainer for ``cfg.trainer`` logging to ``run_dir``."""
    check_devices(cfg)
    t = cfg.trainer
    devices: Any = t.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    loggers = [CSVLogger(str(run_dir), name="logs", version="")]
    try:
        loggers.append(TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False))
    except ModuleNotFoundError:  # pragma: no cover - tensorboard is a dependency
        warnings.warn("tensorboard is not installed: logging to CSV only", stacklevel=2)
    plugins: list[Any] = [SafeCheckpointIO()]
    if SLURMEnvironment.detect():
        # Requeueing is done at a step boundary by PreemptionCallback, not inside Lightning's
        # signal handler (which would save in the middle of a step).
        plugins.append(SLURMEnvironment(auto_requeue=False))
    strategy: Any = t.strategy
    if str(strategy).startswith("fsdp"):
        strategy = fsdp_strategy(cfg)
    return pl.Trainer(
        default_root_dir=str(run_dir),
        plugins=plugins,
        max_epochs=t.epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=engine_precision(resolved_precision(cfg)),  # mixed precision is the TrainingStep's
        accumulate_grad_batches=1,  # gradient accumulation too (manual optimisation)
        log_every_n_steps=t.log_every_n_steps,
        logger=loggers,
        callbacks=callbacks if callbacks is not None else _callbacks(cfg, run_dir),
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the EpochSampler shards itself (exact resume)
        num_sanity_val_steps=0,
    )


def _prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory and prove checkpoints can be written there, before training."""
    ckpt_dir = run_dir / "checkpoints"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"trainer.output_dir: {ckpt_dir} exists and is not a directory") from None
    except OSError as e:
        raise ConfigError(f"trainer.output_dir: cannot create {ckpt_dir}: {e.strerror or e}") from None
    probe = ckpt_dir / f".write-probe-{os.getpid()}"
    try:
        atomic_save({}, probe)
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise ConfigError(f"trainer.output_dir: cannot write checkpoints in {ckpt_dir}: "
                          f"{atomic.reason(e)}") from None
    remove_stale_temp_files(ckpt_dir)


def fit(cfg: Config) -> FitResult:
    """Train ``cfg`` end to end; returns the run directory, last checkpoint and trained method.

    Raises :class:`~dinokit.train.preemption.Preempted` after checkpointing on SIGTERM/SIGUSR1
    (:class:`~dinokit.train.preemption.Interrupted` on Ctrl-C),
    :class:`~dinokit.train.guards.CollapseDetected` with ``trainer.stop_on_collapse``,
    :class:`~dinokit.train.step.NonFiniteTrainingError` after checkpointing the last finite state,
    :class:`~dinokit.train.run_lock.RunDirectoryLockedError` when another training holds the run
    directory, and :class:`~dinokit.train.checkpoint_io.CheckpointWriteError` when a checkpoint
    cannot be written (earlier ones are kept).
    """
    cfg = with_band_statistics(with_launcher_env(cfg.validate()))  # the torchrun / srun world
    run_dir = run_directory(cfg)
    with RunLock(run_dir):  # one training at a time in a run directory
        return _fit_in(cfg, run_dir)


def _fit_in(cfg: Config, run_dir: Path) -> FitResult:
    """:func:`fit` in its run directory, whose lock this process holds."""
    ckpt = resume_checkpoint(cfg, run_dir)
    if ckpt is not None:
        check_resume_compatible(ckpt, cfg)
    _prepare_run_dir(run_dir)
    kept = _keep_previous_metrics(run_dir) if ckpt is not None else None
    atomic.write_text(run_dir / "config.yaml", cfg.to_yaml())
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)

    build_cfg = cfg
    if ckpt is not None:  # resuming: weights come from the checkpoint, start-up files are not re-read
        build_cfg = copy.deepcopy(cfg)
        build_cfg.model.init_weights = build_cfg.gram.teacher_path = None
    method = build_method(build_cfg)
    loader = build_train_loader(cfg, method)
    # starting fresh from a dinokit run's heads skips a head warm-up (a resumed run's checkpoint
    # holds where its stages ended instead)
    module = build_module(cfg, method, heads_loaded=ckpt is None and gives_heads(cfg.model.init_weights))
    if ckpt is not None:
        check_checkpoint_fits(ckpt, module)
        check_external_networks(ckpt, method)
    if cfg.trainer.compile:
        method.compile()  # the whole forward: student, teacher, heads and every loss term
    with quiet_lightning((*LIGHTNING_NOISE, *FIT_NOISE)):
        trainer = build_trainer(cfg, run_dir)
        prepare_for_strategy(method, trainer, cfg.trainer.sync_batchnorm)  # SyncBatchNorm across processes
        preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCallback))
        try:
            with preemption.catching_ctrl_c():
                trainer.fit(module, train_dataloaders=loader, ckpt_path=str(ckpt) if ckpt else None,
                            weights_only=True)
        except Exception as e:
            if not isinstance(e, Preempted):  # tell where to restart from (the CLI prints it)
                with contextlib.suppress(Exception):
                    e.newest_checkpoint = newest_finite_checkpoint(trainer, run_dir)  # type: ignore[attr-defined]
            raise
    metrics = run_dir / "logs" / "metrics.csv"
    if kept is not None and not metrics.exists():  # nothing trained (already at max_steps)
        kept.rename(metrics)
    skipped = _report_skipped(loader.dataset)
    if trainer.is_global_zero:
        _write_curves(run_dir, cfg.dino.n_prototypes,
                      logged=trainer.global_step >= cfg.trainer.log_every_n_steps)
        _write_pca(cfg, method, getattr(loader.dataset, "dataset", None), run_dir)
    guard = next((c for c in trainer.callbacks if isinstance(c, CollapseGuard)), None)
    return FitResult(run_dir, newest_finite_checkpoint(trainer, run_dir), method, module, trainer,
                     collapse=guard.status if guard else "", skipped_images=skipped,
                     damaged_shards=list(getattr(loader.dataset, "damaged", [])))


def newest_finite_checkpoint(trainer: pl.Trainer | None, run_dir: str | Path) -> Path | None:
    """The newest checkpoint of the run whose weights are all finite (for final messages).

    Uses what this process wrote (only finite weights are ever written); falls back to
    verifying the run directory's files, newest first.
    """
    io = getattr(getattr(trainer, "strategy", None), "checkpoint_io", None)
    if isinstance(io, SafeCheckpointIO):
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        if io.written and last.is_file() and last in io.written:
            return last
        newest = io.newest_finite()
        if newest is not None:
            return newest
    found, _ = newest_good_checkpoint(run_checkpoints(run_dir), skip_unreadable=True)
    return found


def _report_skipped(dataset: object) -> int:
    """Warn with the count of unreadable images skipped during the run, over all loader workers
    (each was named when skipped); returns the count."""
    inner = dataset
    for _ in range(4):  # SeededViews -> Subset -> ImageFolderDataset
        if hasattr(inner, "skipped"):
            break
        inner = getattr(inner, "dataset", inner)
    skipped = getattr(inner, "skipped", None)
    if skipped:
        warnings.warn(f"{len(skipped)} unreadable image(s) were skipped: {inner.summary()}", stacklevel=2)
    return len(skipped or [])


def _keep_previous_metrics(run_dir: Path) -> Path | None:
    """Lightning's CSV logger deletes metrics.csv when a run resumes: keep it as a numbered part
    (``read_metrics`` stitches the parts back together)."""
    current = run_dir / "logs" / "metrics.csv"
    if current.is_file():
        n = len(list(current.parent.glob("metrics.part*.csv")))
        part = current.parent / f"metrics.part{n:03d}.csv"
        current.rename(part)
        return part
    return None


def _write_curves(run_dir: Path, n_prototypes: int, logged: bool = True) -> None:
    """Draw ``pictures/curves.png``; ``logged``: whether the run was long enough to log a step
    (a shorter one has nothing to draw, which is no reason to warn)."""
    if not logged and not any((run_dir / "logs").glob("metrics*.csv")):
        return
    try:
        plot_training_curves(run_dir, run_dir / "pictures" / "curves.png", n_prototypes)
    except (ValueError, FileNotFoundError) as e:
        warnings.warn(f"training curves not drawn: {e}", stacklevel=2)


def _write_pca(cfg: Config, method: Any, images: Any, run_dir: Path, n_images: int = 6) -> None:
    """Draw ``pictures/pca.png``: the first three principal components of the deployed backbone's
    patch tokens (the teacher; a distillation's student) on the first ``n_images`` of ``images``
    (the training loader's own dataset, before its crops) in the run's eval transform, as RGB,
    when the backbone gives a patch grid (ViTs). A stream (no indexable dataset) or an
    FSDP-sharded model draws nothing; a failure is a warning, never a lost run."""
    backbone = getattr(method, "deployed_backbone", None) or getattr(method, "teacher_backbone", None)
    if getattr(backbone, "patch_size", None) is None or not hasattr(images, "__getitem__"):
        return
    if any(hasattr(p, "full_tensor") for p in backbone.parameters()):
        return
    from dinokit.viz.pca import pca_patch_maps, plot_pca  # matplotlib: only when drawing

    was_training = backbone.training
    try:
        prep = build_preprocessing(cfg)
        tf = prep.eval_transform()
        firsts = [images[i] for i in range(min(n_images, len(images)))]
        x = torch.stack([tf(item[0] if isinstance(item, (tuple, list)) else item) for item in firsts])
        with torch.no_grad():
            patches = backbone.eval()(x.to(next(backbone.parameters()).device)).patches
        if patches is None:
            return
        maps = pca_patch_maps(patches.float().cpu(), backbone.grid_size(x.shape[-2], x.shape[-1]))
        plot_pca(x, maps, run_dir / "pictures" / "pca.png", mean=tuple(prep.mean), std=tuple(prep.std))
    except Exception as e:  # a picture is never worth the run
        warnings.warn(f"PCA maps not drawn: {type(e).__name__}: {e}", stacklevel=2)
    finally:
        backbone.train(was_training)


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config saved in a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a dinokit run directory (no config.yaml)")
    return from_dict(upgrade_saved(yaml.safe_load(path.read_text())))
