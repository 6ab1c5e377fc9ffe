"""Builders: the only place that reads a :class:`~dinokit.config.Config` to make parts.

Parts (methods, transforms, datasets, the Lightning module) take plain arguments; these functions
translate a config into those arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dinokit.backbones import BackboneArgumentError, BackboneError, check_crop_sizes
from dinokit.clock import frozen_prefixes, place_stages
from dinokit.config import Config, ConfigError
from dinokit.data import (
    ImageFolderDataset,
    MultiCropCollate,
    MultiCropConfig,
    MultiCropTransform,
    load_demo_dataset,
)
from dinokit.data.batched import BatchedMultiCrop, DecodeUInt8, UInt8Collate
from dinokit.data.multiband import MultiBandFolderDataset, band_statistics
from dinokit.data.preprocessing import Preprocessing
from dinokit.data.scenes import scene_dataset
from dinokit.data.streaming import INDEX_FILE, ShardStream, StreamLoader
from dinokit.masking import make_mask_generator
from dinokit.methods.base import SelfDistillationMethod
from dinokit.methods.registry import build_method as build_registered
from dinokit.methods.registry import method_spec
from dinokit.settings import MethodSettings
from dinokit.train.loader import ByStage, ResumableDataLoader, SeededViews
from dinokit.train.module import DINOModule
from dinokit.train.step import STEP_PRECISIONS, StepSettings
from dinokit.weights import apply_init_weights
from dinokit.worker_signals import IgnoreStopSignals


def build_method(cfg: Config) -> SelfDistillationMethod:
    """The method of ``cfg`` (its registered preset, from the method's config sections; unset
    method-dependent keys keep the method's official default), then the ``model.init_weights``
    and ``gram.teacher_path`` files loaded."""
    try:
        spec = method_spec(cfg.model.method)
    except KeyError as e:
        raise ConfigError(f"model.method: {e.args[0]}") from None
    try:
        method = build_registered(cfg.model.method, MethodSettings.from_config(cfg))
    except BackboneError as e:
        key = "backbone.kwargs" if isinstance(e, BackboneArgumentError) else "backbone.name"
        raise ConfigError(f"{key}: {e}") from None
    except ValueError as e:
        if str(e).startswith(("backbone.", "model.teacher")):
            raise ConfigError(str(e)) from None
        raise
    present = set(method.term_timings())
    for i, stage in enumerate(cfg.stages):
        try:
            frozen_prefixes(stage.frozen, method.head_names)
        except ValueError as e:
            raise ConfigError(f"stages[{i}].frozen: {e}") from None
        for term in stage.weights:
            if term not in present:
                raise ConfigError(f"stages[{i}].weights.{term}: the run has no {term} term (its weight "
                                  f"is 0 or the method {spec.name!r} has none)")
    if cfg.gram.teacher_path:
        if not hasattr(method, "load_gram_teacher"):
            raise ConfigError(f"gram.teacher_path: method {cfg.model.method!r} has no Gram teacher")
        method.load_gram_teacher(cfg.gram.teacher_path)
    if getattr(method, "objective", None) == "features" and cfg.crops.n_local > 0:
        warnings.warn(f"crops.n_local={cfg.crops.n_local}: feature distillation reads the global crops only; "
                      "the local crops are made and never used (crops.n_local=0 saves making them)",
                      UserWarning, stacklevel=2)
    mc = build_multicrop_config(cfg)
    check_crop_sizes(method.student_backbone.patch_size, {"crops.global_size": mc.global_size,
                                                          "crops.local_size": mc.local_size})
    check_crop_sizes(getattr(method, "mask_patch_size", None), {"crops.global_size": mc.global_size})
    apply_init_weights(method, cfg)  # init_weights -> student, teacher, Gram teacher; freeze_patch_embed
    return method


def build_multicrop_config(cfg: Config) -> Any:
    """The augmentation config from ``cfg.data`` (preset + explicit overrides)."""
    d, c = cfg.data, cfg.crops
    base = MultiCropConfig.small(c.source_size) if c.preset == "small" else MultiCropConfig()
    if d.channels not in (1, 3):  # multi-band: the preset without its RGB-only operations
        base = MultiCropConfig.for_bands(d.channels, base)
    changes: dict[str, Any] = dict(
        n_global=c.n_global,
        n_local=c.n_local,
        channels=d.channels,
    )
    if c.preset == "imagenet" or c.global_scale != (0.4, 1.0):
        changes["global_scale"] = tuple(c.global_scale)
    if c.preset == "imagenet" or c.local_scale != (0.05, 0.4):
        changes["local_scale"] = tuple(c.local_scale)
    if c.global_size:
        changes["global_size"] = c.global_size
    if c.local_size:
        changes["local_size"] = c.local_size
    for key in ("mean", "std"):  # explicit statistics win over the preset's
        if getattr(d, key) is not None:
            changes[key] = tuple(getattr(d, key))
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        key = next((k for k in ("mean", "std") if f".{k} " in str(e)), None)
        if key is None:
            raise
        raise ConfigError(f"data.{key}: {e}") from None


def with_band_statistics(cfg: Config) -> Config:
    """``data.dataset=multiband`` without ``data.mean``/``data.std``: a copy of ``cfg`` with the
    per-band statistics of ``data.path`` filled in (one streaming pass, as ``dinokit data stats``),
    so that the run records them in its config (and every export of it in its preprocessing).
    Other configs are returned as they are."""
    d = cfg.data
    if d.dataset != "multiband" or (d.mean is not None and d.std is not None):
        return cfg
    stats = band_statistics(d.path, channels=d.channels)
    out = copy.deepcopy(cfg)
    out.data.mean = tuple(stats.mean) if d.mean is None else d.mean
    out.data.std = tuple(stats.std) if d.std is None else d.std
    print(f"per-band statistics of {stats.images} images under {d.path} recorded in the run: "
          f"{stats.overrides()}")
    return out


def build_batched_augment(cfg: Config, device: Any = None) -> Any:
    """For ``data.augment_on=device``: the :class:`~dinokit.data.batched.BatchedMultiCrop` that
    turns the loader's uint8 batches into multi-crop views on ``device``."""
    return BatchedMultiCrop(build_multicrop_config(cfg), device=device)


def build_preprocessing(cfg: Config) -> Any:
    """The run's one :class:`~dinokit.data.preprocessing.Preprocessing` (training crops, eval view,
    k-NN/linear, embed and export all use it)."""
    return Preprocessing.from_multicrop(build_multicrop_config(cfg))


def build_dataset(cfg: Config, split: str = "train", transform: Any = None) -> Dataset:
    """Images of ``cfg.data`` for ``split`` ("train" or "val"), optionally transformed."""
    d = cfg.data
    limit = d.limit if split == "train" else d.val_limit
    if d.dataset == "shards":
        raise ConfigError("data.dataset: shards are a stream, not a dataset to index: set "
                          "trainer.knn_every_n_epochs=0 and score checkpoints with `dinokit eval knn` "
                          "on labelled folders")
    if d.dataset in ("folder", "multiband"):
        path = d.path if split == "train" else d.val_path
        if path is None:
            raise ConfigError(f"data.val_path: needed for validation with data.dataset={d.dataset}")
        if d.dataset == "multiband":
            return MultiBandFolderDataset(path, transform=transform, channels=d.channels,
                                          strict=d.strict_images)
        return ImageFolderDataset(path, transform=transform, strict=d.strict_images,
                                  max_pixels=d.max_image_pixels)
    if d.dataset in ("scenes", "scene-items"):
        return scene_dataset(d.dataset, "train" if split == "train" else "test", transform, limit)
    name = {"demo": "auto"}.get(d.dataset, d.dataset)
    ds = load_demo_dataset(name, split="train" if split == "train" else "test", transform=transform,
                           limit=limit)
    return ds


def build_collate(cfg: Config, method: SelfDistillationMethod) -> Any:
    """The multi-crop collate, with iBOT block masks when the method's terms need them."""
    m = cfg.ibot
    if not getattr(method, "needs_masks", False):
        return MultiCropCollate()
    mc = build_multicrop_config(cfg)
    ps = getattr(method, "mask_patch_size", None) or method.student_backbone.patch_size  # the masks' grid
    grid = (mc.global_size // ps, mc.global_size // ps)
    return MultiCropCollate(
        mask_generator=make_mask_generator(m.mask_mode, grid),
        patch_size=ps,
        mask_probability=m.mask_probability,
        mask_ratio_range=tuple(m.mask_ratio_range),
        mask_sampling=m.mask_sampling,
    )


def planned_world_size(cfg: Config) -> int:
    """Processes of the run: the launcher's ``WORLD_SIZE``, else ``devices x num_nodes``."""
    env = os.environ.get("WORLD_SIZE")
    if env and env.isdigit():
        return max(1, int(env))
    devices = cfg.trainer.devices
    n = int(devices) if isinstance(devices, int) or str(devices).isdigit() else \
        len([x for x in str(devices).split(",") if x.strip()]) if "," in str(devices) else 1
    return max(1, n) * max(1, int(cfg.trainer.num_nodes))


def check_devices(cfg: Config) -> None:
    """Fail naming ``trainer.devices`` when it lists GPU indices this run cannot use (a list on
    the CPU, or an index beyond the GPUs found); Lightning's own errors do not name the key."""
    t = cfg.trainer
    if "," not in str(t.devices) or t.accelerator not in ("auto", "cpu", "gpu", "cuda"):
        return
    indices = [int(x) for x in str(t.devices).split(",") if x.strip()]
    if t.accelerator == "auto" and not torch.cuda.is_available() and torch.backends.mps.is_available():
        return  # Lightning's MPS accelerator takes index lists
    if t.accelerator == "cpu" or not torch.cuda.is_available():
        why = "trainer.accelerator=cpu" if t.accelerator == "cpu" else "no GPU was found"
        raise ConfigError(f"trainer.devices: {indices} are GPU indices, but this run is on the CPU ({why}); "
                          f"give a process count instead, e.g. trainer.devices={len(indices)}")
    n = torch.cuda.device_count()
    missing = [i for i in indices if i >= n]
    if missing:
        raise ConfigError(f"trainer.devices: GPU {missing[0]} does not exist; this machine has {n} GPU(s), "
                          f"indices 0 to {n - 1}")


def build_stream_loader(cfg: Config, method: SelfDistillationMethod) -> Any:
    """``data.dataset=shards``: a resumable :class:`~dinokit.data.streaming.StreamLoader` over
    WebDataset shards (every sample once per pass across processes and workers; an epoch is
    ``data.iterations_per_epoch`` batches, by default one pass over ``index.json``'s samples)."""
    d = cfg.data
    local = "{" not in str(d.path) and "://" not in str(d.path)
    if local and not Path(d.path).exists():
        raise ConfigError(f"data.path: {d.path} does not exist (a folder of .tar shards, its index.json, "
                          "or a brace pattern such as data/shard-{000000..000127}.tar)")
    try:
        stream = ShardStream(d.path, d.batch_size, transform=MultiCropTransform(build_multicrop_config(cfg)),
                             collate=build_collate(cfg, method), seed=cfg.trainer.seed,
                             shuffle=d.shuffle_buffer, strict=d.strict_images,
                             max_pixels=d.max_image_pixels)
    except FileNotFoundError as e:
        raise ConfigError(f"data.path: {e}") from None
    iterations = d.iterations_per_epoch
    if iterations is None:
        index = Path(d.path) / INDEX_FILE if Path(d.path).is_dir() else Path(d.path)
        if index.suffix != ".json" or not index.is_file():
            raise ConfigError(f"data.iterations_per_epoch: needed with data.dataset=shards when "
                              f"{d.path} has no {INDEX_FILE} giving the sample count")
        total = int(json.loads(index.read_text()).get("total", 0))
        iterations = total // (d.batch_size * planned_world_size(cfg))
        if iterations < 1:
            raise ConfigError(f"data.batch_size: {d.batch_size} x {planned_world_size(cfg)} process(es) "
                              f"is more than the {total} samples in {index}")
    return StreamLoader(stream, iterations, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=IgnoreStopSignals())  # the main process handles SIGTERM/SIGINT


def build_train_loader(cfg: Config, method: SelfDistillationMethod) -> DataLoader:
    """The resumable multi-crop training loader (masks for DINOv2/v3 made in the collate)."""
    d = cfg.data
    mc = build_multicrop_config(cfg)
    if d.dataset == "shards":
        return build_stream_loader(cfg, method)
    dataset = build_dataset(cfg, "train")
    if d.dataset in ("folder", "multiband") and d.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(d.limit, len(dataset))))
    views = SeededViews(dataset, MultiCropTransform(mc), seed=cfg.trainer.seed)
    collate = build_collate(cfg, method)
    if d.augment_on == "device":  # uint8 images; BatchedMultiCrop (build_batched_augment) crops them
        views = SeededViews(views.dataset, DecodeUInt8(mc.channels), seed=cfg.trainer.seed)
        collate = UInt8Collate(collate if collate.mask_generator is not None else None, mc.n_global,
                               mc.global_size)
    if len(views) < d.batch_size:
        raise ConfigError(
            f"data.batch_size: {d.batch_size} is larger than the dataset ({len(views)} images)"
        )
    staged_collate = None
    if any(s.crops for s in cfg.stages):  # stages with their own crops: picked per sample by its step
        views.staged, staged_collate = stage_crops(cfg, method, len(views))
    return ResumableDataLoader(
        views,
        batch_size=d.batch_size,
        seed=cfg.trainer.seed,
        num_workers=d.num_workers,
        collate_fn=collate,
        staged_collate=staged_collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=d.num_workers > 0,
    )


def stage_crops(cfg: Config, method: SelfDistillationMethod, n_images: int) -> tuple[ByStage, ByStage]:
    """The multi-crop transform and the collate of each stage (its ``crops`` over ``cfg.crops``),
    picked per sample by the optimiser step it is drawn for: ``(transforms, collates)``."""
    world, d = planned_world_size(cfg), cfg.data
    batches = (n_images // world) // d.batch_size
    steps_per_epoch = max(1, math.ceil(batches / cfg.trainer.accumulate_grad_batches))
    with warnings.catch_warnings():  # the run's own clock warns about stages past its end
        warnings.simplefilter("ignore")
        starts = [s.start for s in place_stages(cfg.stages, 1 << 40, steps_per_epoch)]
    transforms, collates = [], []
    for i, stage in enumerate(cfg.stages):
        staged = dataclasses.replace(cfg, crops=dataclasses.replace(cfg.crops, **stage.crops))
        mc = build_multicrop_config(staged)
        sizes = {f"stages[{i}].crops.global_size": mc.global_size,
                 f"stages[{i}].crops.local_size": mc.local_size}
        try:
            check_crop_sizes(method.student_backbone.patch_size, sizes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        transforms.append(MultiCropTransform(mc))
        collates.append(build_collate(staged, method))
    common = dict(steps_per_epoch=steps_per_epoch, batch_size=d.batch_size,
                  accumulate=cfg.trainer.accumulate_grad_batches)
    return ByStage(transforms, starts, **common), ByStage(collates, starts, **common)


def resolved_precision(cfg: Config) -> str:
    """``trainer.precision``, with ``auto`` resolved: bf16 autocast on a CUDA GPU that has bf16
    (A100, H100, ...), full fp32 elsewhere (CPU autocast to bf16 is slower than fp32 there)."""
    p = cfg.trainer.precision
    if p != "auto":
        return p
    return "bf16-mixed" if uses_cuda(cfg) and torch.cuda.is_bf16_supported() else "32-true"


def uses_cuda(cfg: Config) -> bool:
    """Whether the run trains on CUDA GPUs (``trainer.accelerator`` auto/gpu/cuda and one is there)."""
    return cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def build_module(cfg: Config, method: SelfDistillationMethod, heads_loaded: bool = False) -> DINOModule:
    """The Lightning module: ``cfg.optim``, the run's precision, accumulation, guard and stages;
    ``heads_loaded`` (``model.init_weights`` gave trained heads) skips the stages marked
    ``skip_with_init_heads``."""
    precision = resolved_precision(cfg)
    settings = StepSettings(optim=cfg.optim,
                            precision=precision if precision in STEP_PRECISIONS else "32-true",
                            accumulate=cfg.trainer.accumulate_grad_batches,
                            max_nonfinite_steps=cfg.trainer.max_nonfinite_steps)
    skipped = {i: 0 for i, s in enumerate(cfg.stages) if heads_loaded and s.skip_with_init_heads}
    return DINOModule(method, settings, stages=cfg.stages, stage_lengths=skipped,
                      augment=build_batched_augment(cfg) if cfg.data.augment_on == "device" else None,
                      seed=cfg.trainer.seed, n_global=cfg.crops.n_global, config=cfg.to_dict())
