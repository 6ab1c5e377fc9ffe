"""Builders: the only place that reads a :class:`~dinokit.config.Config` to make parts.

Parts (methods, transforms, datasets, the Lightning module) take plain arguments; these functions
translate a config into those arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dinokit.config import Config, ConfigError
from dinokit.methods.base import SelfDistillationMethod


def method_classes() -> dict[str, type[SelfDistillationMethod]]:
    """``model.method`` name -> class, from the method registry."""
    from dinokit.methods.registry import METHODS

    return {name: spec.cls for name, spec in METHODS.items()}


def resolved_training(cfg: Config) -> dict[str, str]:
    """``optim.clip_mode``, ``no_decay_rule`` and ``freeze_last_layer_mode`` with ``auto``
    replaced by the method's official choice (declared in its registry entry)."""
    from dinokit.methods.registry import method_spec

    spec = method_spec(cfg.model.method)
    o = cfg.optim
    out = {"clip_mode": o.clip_mode, "no_decay_rule": o.no_decay_rule,
           "freeze_last_layer_mode": o.freeze_last_layer_mode}
    defaults = {"clip_mode": "per_param", "no_decay_rule": "dino", "freeze_last_layer_mode": "cancel_grad"}
    return {k: (spec.training.get(k, defaults[k]) if v == "auto" else v) for k, v in out.items()}


def build_method(cfg: Config) -> SelfDistillationMethod:
    """The method module of ``cfg.model``, built from its registry entry (config keys the entry
    declares; unset method-dependent keys keep the method's official default), then the
    ``init_weights`` and Gram teacher files loaded."""
    from dinokit.methods.registry import build_method_from, method_spec

    m = cfg.model
    try:
        spec = method_spec(m.method)
    except KeyError as e:
        raise ConfigError(f"model.method: {e.args[0]}") from None
    encoder_kwargs = dict(m.backbone_kwargs)
    if m.drop_path_rate:
        encoder_kwargs.setdefault("drop_path_rate", m.drop_path_rate)
    values = {k: v for k, v in dataclasses.asdict(m).items() if v is not None}
    method = build_method_from(spec, values, encoder_kwargs=encoder_kwargs)
    method.student_backbone.packed_crops = {"true": True, "false": False}.get(m.packed_crops, "auto")
    configure_stochastic_depth(method.student_backbone, cfg, encoder_kwargs.get("drop_path_rate", 0.0))
    if m.channels_last:
        from dinokit.backbones.generic import use_channels_last

        use_channels_last(method)
    if getattr(m, "gram_teacher_path", None):
        if not hasattr(method, "load_gram_teacher"):
            raise ConfigError(f"model.gram_teacher_path: method {m.method!r} has no Gram teacher")
        method.load_gram_teacher(m.gram_teacher_path)
    from dinokit.backbones import check_crop_sizes
    from dinokit.weights import apply_init_weights

    mc = build_multicrop_config(cfg)
    check_crop_sizes(method.student_backbone.patch_size, {"data.global_size": mc.global_size,
                                                          "data.local_size": mc.local_size})
    apply_init_weights(method, cfg)  # init_weights -> student, teacher, Gram teacher; freeze_patch_embed
    return method


def configure_stochastic_depth(backbone: Any, cfg: Config, rate: float) -> None:
    """``model.drop_path_uniform`` and ``model.drop_path_mode`` (``auto``/None: the method's
    official choice, from its registry entry) applied to the student ``backbone`` built with
    drop-path ``rate``."""
    from dinokit.backbones.stochastic_depth import set_uniform_drop_path
    from dinokit.methods.registry import method_spec

    m = cfg.model
    spec = method_spec(m.method)
    uniform = spec.drop_path_uniform if m.drop_path_uniform is None else m.drop_path_uniform
    blocks = getattr(getattr(backbone, "model", None), "blocks", None)
    if uniform and rate:
        if blocks is not None:
            set_uniform_drop_path(blocks, rate)
        elif m.drop_path_uniform:
            raise ConfigError("model.drop_path_uniform: the backbone has no ViT blocks to give one rate")
    supported = hasattr(backbone, "drop_path_mode")
    if m.drop_path_mode == "subset" and not supported:
        raise ConfigError("model.drop_path_mode: 'subset' needs a timm ViT backbone, not "
                          f"{type(backbone).__name__} (use auto or sample)")
    above = {"auto": spec.drop_path_subset_above, "subset": 0.0, "sample": None}[m.drop_path_mode]
    if supported:
        backbone.drop_path_mode = "sample" if above is None else "subset"
        backbone.drop_path_subset_above = float(above or 0.0)


def build_multicrop_config(cfg: Config) -> Any:
    """The augmentation config from ``cfg.data`` (preset + explicit overrides)."""
    from dinokit.data import MultiCropConfig

    d = cfg.data
    base = MultiCropConfig.small(d.source_size) if d.crop_preset == "small" else MultiCropConfig()
    changes: dict[str, Any] = dict(
        n_global=d.n_global,
        n_local=d.n_local,
        channels=d.channels,
    )
    if d.crop_preset == "imagenet" or d.global_scale != (0.4, 1.0):
        changes["global_scale"] = tuple(d.global_scale)
    if d.crop_preset == "imagenet" or d.local_scale != (0.05, 0.4):
        changes["local_scale"] = tuple(d.local_scale)
    if d.global_size:
        changes["global_size"] = d.global_size
    if d.local_size:
        changes["local_size"] = d.local_size
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


def build_batched_augment(cfg: Config, device: Any = None) -> Any:
    """For ``data.augment_on=device``: the :class:`~dinokit.data.batched.BatchedMultiCrop` that
    turns the loader's uint8 batches into multi-crop views on ``device``."""
    from dinokit.data.batched import BatchedMultiCrop

    return BatchedMultiCrop(build_multicrop_config(cfg), device=device)


def build_preprocessing(cfg: Config) -> Any:
    """The run's one :class:`~dinokit.data.preprocessing.Preprocessing` (training crops, eval view,
    k-NN/linear, embed and export all use it)."""
    from dinokit.data.preprocessing import Preprocessing

    return Preprocessing.from_multicrop(build_multicrop_config(cfg))


def build_dataset(cfg: Config, split: str = "train", transform: Any = None) -> Dataset:
    """Images of ``cfg.data`` for ``split`` ("train" or "val"), optionally transformed."""
    from dinokit.data import ImageFolderDataset, load_demo_dataset

    d = cfg.data
    limit = d.limit if split == "train" else d.val_limit
    if d.dataset == "shards":
        raise ConfigError("data.dataset: shards are a stream, not a dataset to index: set "
                          "trainer.knn_every_n_epochs=0 and score checkpoints with `dinokit eval knn` "
                          "on labelled folders")
    if d.dataset == "folder":
        path = d.path if split == "train" else d.val_path
        if path is None:
            raise ConfigError("data.val_path: needed for validation with data.dataset=folder")
        return ImageFolderDataset(path, transform=transform, strict=d.strict_images)
    name = {"demo": "auto"}.get(d.dataset, d.dataset)
    ds = load_demo_dataset(name, split="train" if split == "train" else "test", transform=transform,
                           limit=limit)
    return ds


def build_collate(cfg: Config, method: SelfDistillationMethod) -> Any:
    """The multi-crop collate, with iBOT block masks when the method's terms need them."""
    from dinokit.data import MultiCropCollate
    from dinokit.masking import make_mask_generator

    d = cfg.data
    if not getattr(method, "needs_masks", False):
        return MultiCropCollate()
    mc = build_multicrop_config(cfg)
    ps = method.student_backbone.patch_size
    grid = (mc.global_size // ps, mc.global_size // ps)
    return MultiCropCollate(
        mask_generator=make_mask_generator(d.mask_mode, grid),
        patch_size=ps,
        mask_probability=d.mask_probability,
        mask_ratio_range=tuple(d.mask_ratio_range),
        mask_sampling=d.mask_sampling,
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


def build_stream_loader(cfg: Config, method: SelfDistillationMethod) -> Any:
    """``data.dataset=shards``: a resumable :class:`~dinokit.data.streaming.StreamLoader` over
    WebDataset shards (every sample once per pass across processes and workers; an epoch is
    ``data.iterations_per_epoch`` batches, by default one pass over ``index.json``'s samples)."""
    from dinokit.data import MultiCropTransform
    from dinokit.data.streaming import INDEX_FILE, ShardStream, StreamLoader

    d = cfg.data
    local = "{" not in str(d.path) and "://" not in str(d.path)
    if local and not Path(d.path).exists():
        raise ConfigError(f"data.path: {d.path} does not exist (a folder of .tar shards, its index.json, "
                          "or a brace pattern such as data/shard-{000000..000127}.tar)")
    try:
        stream = ShardStream(d.path, d.batch_size, transform=MultiCropTransform(build_multicrop_config(cfg)),
                             collate=build_collate(cfg, method), seed=cfg.trainer.seed,
                             shuffle=d.shuffle_buffer)
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
    from dinokit.train.loader import IgnoreStopSignals

    return StreamLoader(stream, iterations, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=IgnoreStopSignals())  # the main process handles SIGTERM/SIGINT


def build_train_loader(cfg: Config, method: SelfDistillationMethod) -> DataLoader:
    """The resumable multi-crop training loader (masks for DINOv2/v3 made in the collate)."""
    from dinokit.data import MultiCropTransform
    from dinokit.train.loader import ResumableDataLoader, SeededViews

    d = cfg.data
    mc = build_multicrop_config(cfg)
    if d.dataset == "shards":
        return build_stream_loader(cfg, method)
    dataset = build_dataset(cfg, "train")
    if d.dataset == "folder" and d.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(d.limit, len(dataset))))
    views = SeededViews(dataset, MultiCropTransform(mc), seed=cfg.trainer.seed)
    collate = build_collate(cfg, method)
    if d.augment_on == "device":  # uint8 images; BatchedMultiCrop (build_batched_augment) crops them
        from dinokit.data.batched import DecodeUInt8, UInt8Collate

        views = SeededViews(views.dataset, DecodeUInt8(mc.channels), seed=cfg.trainer.seed)
        collate = UInt8Collate(collate if collate.mask_generator is not None else None, mc.n_global,
                               mc.global_size)
    if len(views) < d.batch_size:
        raise ConfigError(
            f"data.batch_size: {d.batch_size} is larger than the dataset ({len(views)} images)"
        )
    return ResumableDataLoader(
        views,
        batch_size=d.batch_size,
        seed=cfg.trainer.seed,
        num_workers=d.num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=d.num_workers > 0,
    )


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


def build_module(cfg: Config, method: SelfDistillationMethod) -> Any:
    """The Lightning module with ``cfg.optim``'s settings."""
    from dinokit.train.module import DINOModule
    from dinokit.train.step import STEP_PRECISIONS

    o = cfg.optim
    return DINOModule(
        method,
        optimizer=o.optimizer,
        lr=o.lr,
        lr_scaling=o.lr_scaling,
        lr_reference_batch=o.lr_reference_batch,
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        clip_grad=o.clip_grad,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs,
        **resolved_training(cfg),
        max_nonfinite_steps=cfg.trainer.max_nonfinite_steps,
        accumulate=cfg.trainer.accumulate_grad_batches,
        precision=resolved_precision(cfg) if resolved_precision(cfg) in STEP_PRECISIONS else "32-true",
        augment=build_batched_augment(cfg) if cfg.data.augment_on == "device" else None,
        seed=cfg.trainer.seed,
        layer_decay=o.layer_decay,
        patch_embed_lr_mult=o.patch_embed_lr_mult,
        momentum=o.momentum,
        betas=tuple(o.betas),
        n_global=cfg.data.n_global,
        config=cfg.to_dict(),
    )
