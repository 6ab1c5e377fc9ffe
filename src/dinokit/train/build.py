"""Builders: the only place that reads a :class:`~dinokit.config.Config` to make parts.

Parts (methods, transforms, datasets, the Lightning module) take plain arguments; these functions
translate a config into those arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dinokit.config import Config, ConfigError
from dinokit.methods.base import SelfDistillationMethod


def method_classes() -> dict[str, type[SelfDistillationMethod]]:
    """``model.method`` name -> class (an explicit table, no lookups by string in modules)."""
    from dinokit.methods.dino import DINO

    table: dict[str, type[SelfDistillationMethod]] = {"dino": DINO}
    try:
        from dinokit.methods.dinov2 import DINOv2
        from dinokit.methods.dinov3 import DINOv3

        table.update({"dinov2": DINOv2, "dinov3": DINOv3})
    except ImportError:  # pragma: no cover - while the v2/v3 methods are being built
        pass
    return table


def build_method(cfg: Config) -> SelfDistillationMethod:
    """The method module of ``cfg.model`` (weights from ``init_weights`` loaded into both
    student and teacher backbones)."""
    m = cfg.model
    classes = method_classes()
    if m.method not in classes:
        raise ConfigError(f"model.method: {m.method!r} is not available; choose from {sorted(classes)}")
    encoder_kwargs = dict(m.backbone_kwargs)
    if m.drop_path_rate:
        encoder_kwargs.setdefault("drop_path_rate", m.drop_path_rate)
    common: dict[str, Any] = dict(
        encoder_name=m.backbone,
        projector_hidden_dim=m.head_hidden_dim,
        projector_bottleneck_dim=m.head_bottleneck_dim,
        n_prototypes=m.n_prototypes,
        temperature_student=m.temperature_student,
        temperature_teacher_warmup=m.temperature_teacher_warmup,
        temperature_teacher=m.temperature_teacher,
        warmup_epochs_temperature_teacher=m.warmup_epochs_temperature_teacher,
        center_momentum=m.center_momentum,
        ema_decay_start=m.ema_decay_start,
        ema_decay_end=m.ema_decay_end,
        encoder_kwargs=encoder_kwargs,
        pretrained=m.pretrained,
        norm_last_layer=m.norm_last_layer,
    )
    if m.method == "dino":
        method = classes["dino"](
            **common, projector_batch_norm=m.head_batch_norm, projector_layers=m.head_layers
        )
    else:
        extra: dict[str, Any] = dict(
            n_patch_prototypes=m.n_patch_prototypes,
            shared_head=m.shared_head,
            centering=m.centering,
            sinkhorn_iterations=m.sinkhorn_iterations,
            patch_loss_weight=m.patch_loss_weight,
            koleo_weight=m.koleo_weight,
            n_register_tokens=m.n_registers,
        )
        if m.method == "dinov3":
            extra.update(
                gram_weight=m.gram_weight,
                gram_start_step=m.gram_start_step,
                gram_ramp_steps=m.gram_ramp_steps,
                gram_refresh_every=m.gram_refresh_every,
            )
        method = classes[m.method](**common, **extra)
        if m.method == "dinov3" and m.gram_teacher_path:
            method.load_gram_teacher(m.gram_teacher_path)
    if m.init_weights:
        from dinokit.weights import load_backbone_file

        load_backbone_file(method.student_backbone, m.init_weights)
        method.teacher_backbone.load_state_dict(method.student_backbone.state_dict())
    return method


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
    return dataclasses.replace(base, **changes)


def build_dataset(cfg: Config, split: str = "train", transform: Any = None) -> Dataset:
    """Images of ``cfg.data`` for ``split`` ("train" or "val"), optionally transformed."""
    from dinokit.data import ImageFolderDataset, load_demo_dataset

    d = cfg.data
    limit = d.limit if split == "train" else d.val_limit
    if d.dataset == "folder":
        path = d.path if split == "train" else d.val_path
        if path is None:
            raise ConfigError("data.val_path: needed for validation with data.dataset=folder")
        return ImageFolderDataset(path, transform=transform, strict=d.strict_images)
    name = {"demo": "auto"}.get(d.dataset, d.dataset)
    ds = load_demo_dataset(name, split="train" if split == "train" else "test", transform=transform,
                           limit=limit)
    return ds


def build_train_loader(cfg: Config, method: SelfDistillationMethod) -> DataLoader:
    """The resumable multi-crop training loader (masks for DINOv2/v3 made in the collate)."""
    from dinokit.data import MultiCropCollate, MultiCropTransform
    from dinokit.masking import make_mask_generator
    from dinokit.train.loader import ResumableDataLoader, SeededViews

    d = cfg.data
    mc = build_multicrop_config(cfg)
    dataset = build_dataset(cfg, "train")
    if d.dataset == "folder" and d.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(d.limit, len(dataset))))
    views = SeededViews(dataset, MultiCropTransform(mc), seed=cfg.trainer.seed)
    collate = MultiCropCollate()
    if cfg.model.method in ("dinov2", "dinov3"):
        backbone = method.student_backbone
        ps = backbone.patch_size
        grid = (mc.global_size // ps, mc.global_size // ps)
        collate = MultiCropCollate(
            mask_generator=make_mask_generator(d.mask_mode, grid),
            patch_size=ps,
            mask_probability=d.mask_probability,
            mask_ratio_range=tuple(d.mask_ratio_range),
        )
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


def build_module(cfg: Config, method: SelfDistillationMethod) -> Any:
    """The Lightning module with ``cfg.optim``'s settings."""
    from dinokit.train.module import DINOModule

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
        clip_mode=o.clip_mode,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs,
        layer_decay=o.layer_decay,
        patch_embed_lr_mult=o.patch_embed_lr_mult,
        momentum=o.momentum,
        betas=tuple(o.betas),
        n_global=cfg.data.n_global,
        config=cfg.to_dict(),
    )
