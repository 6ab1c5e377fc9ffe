"""The method registry: ``model.method`` names -> how to build the method from plain arguments and
what the rest of the library needs to know about it (masks in the batch, the official training
choices). The builder, the collate, config validation and logging read these declarations.

Adding a method is one file (a :class:`~dinokit.methods.composed.ComposedMethod` preset) plus one
:func:`register_method` call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dinokit.methods.base import SelfDistillationMethod


@dataclass(frozen=True)
class MethodSpec:
    """How to build a method and how it is trained by default.

    Attributes:
        name: the ``model.method`` value.
        cls: the method class (constructor takes plain arguments).
        arguments: constructor argument -> ``model.<key>`` config key it comes from.
        needs_masks: batches carry iBOT masks (the collate makes them).
        training: the official training choices the ``"auto"`` optimiser settings resolve to:
            ``no_decay_rule``, ``clip_mode``, ``freeze_last_layer_mode``.
        summary: one line for ``--help`` and errors.
        drop_path_uniform: the official per-block drop-path rates: all equal to the rate (DINOv2's
            ``drop_path_uniform: true``, DINOv3) or ``linspace(0, rate, depth)`` (DINO, iBOT).
        drop_path_subset_above: the official stochastic depth form: the subset form
            (:mod:`~dinokit.backbones.stochastic_depth`) for blocks whose rate is above this (DINOv3 0,
            DINOv2 0.1), timm's per-sample ``DropPath`` below; None = always ``DropPath`` (DINO, iBOT).
    """

    name: str
    cls: type[SelfDistillationMethod]
    arguments: Mapping[str, str]
    needs_masks: bool = False
    training: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    drop_path_uniform: bool = False
    drop_path_subset_above: float | None = None

    @property
    def config_keys(self) -> frozenset[str]:
        return frozenset(self.arguments.values())


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS and METHODS[spec.name] != spec:
        raise ValueError(f"a method named {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def build_method_from(spec: MethodSpec, values: Mapping[str, Any], **extra: Any) -> SelfDistillationMethod:
    """``spec.cls(**{arg: values[key]})`` plus ``extra`` (e.g. ``encoder_kwargs``)."""
    kwargs = {arg: values[key] for arg, key in spec.arguments.items() if key in values}
    kwargs.update(extra)
    return spec.cls(**kwargs)


def _register_builtins() -> None:
    from dinokit.methods.dino import DINO
    from dinokit.methods.dinov2 import DINOv2
    from dinokit.methods.dinov3 import DINOv3
    from dinokit.methods.ibot import IBOT

    common = {
        "encoder_name": "backbone", "pretrained": "pretrained",
        "projector_hidden_dim": "head_hidden_dim", "projector_bottleneck_dim": "head_bottleneck_dim",
        "projector_layers": "head_layers", "n_prototypes": "n_prototypes",
        "temperature_student": "temperature_student",
        "temperature_teacher_warmup": "temperature_teacher_warmup",
        "temperature_teacher": "temperature_teacher",
        "warmup_epochs_temperature_teacher": "warmup_epochs_temperature_teacher",
        "center_momentum": "center_momentum", "ema_decay_start": "ema_decay_start",
        "ema_decay_end": "ema_decay_end", "norm_last_layer": "norm_last_layer",
    }
    v2 = {**common, "n_patch_prototypes": "n_patch_prototypes", "shared_head": "shared_head",
          "centering": "centering", "sinkhorn_iterations": "sinkhorn_iterations",
          "patch_loss_weight": "patch_loss_weight", "koleo_weight": "koleo_weight",
          "koleo_all_processes": "koleo_all_processes", "n_register_tokens": "n_registers",
          "weight_norm": "head_weight_norm", "temperature_warmup_unit": "temperature_warmup_unit"}
    v3 = {**v2, "gram_weight": "gram_weight", "gram_start_step": "gram_start_step",
          "gram_ramp_steps": "gram_ramp_steps", "gram_refresh_every": "gram_refresh_every",
          "gram_first_refresh_step": "gram_first_refresh_step",
          "gram_max_refreshes": "gram_max_refreshes", "gram_ema_teacher": "gram_ema_teacher",
          "gram_img_level": "gram_img_level", "gram_remove_neg": "gram_remove_neg",
          "gram_remove_only_teacher_neg": "gram_remove_only_teacher_neg",
          "gram_teacher_size": "gram_teacher_size"}
    register_method(MethodSpec(
        "dino", DINO, {**common, "projector_batch_norm": "head_batch_norm"},
        training={"no_decay_rule": "dino", "clip_mode": "per_param", "freeze_last_layer_mode": "cancel_grad"},
        summary="DINO (Caron et al. 2021): CLS self-distillation, EMA centring",
    ))
    ibot_args = {k: v for k, v in v2.items() if k not in ("koleo_weight", "koleo_all_processes")}
    register_method(MethodSpec(
        "ibot", IBOT, ibot_args, needs_masks=True,
        training={"no_decay_rule": "dino", "clip_mode": "per_param", "freeze_last_layer_mode": "cancel_grad"},
        summary="iBOT (Zhou et al. 2022): CLS + masked-patch self-distillation, shared head",
    ))
    register_method(MethodSpec(
        "dinov2", DINOv2, v2, needs_masks=True,
        training={"no_decay_rule": "dinov2", "clip_mode": "per_module", "freeze_last_layer_mode": "zero_lr"},
        summary="DINOv2 (Oquab et al. 2024): CLS + iBOT with Sinkhorn-Knopp, KoLeo",
        drop_path_uniform=True, drop_path_subset_above=0.1,
    ))
    register_method(MethodSpec(
        "dinov3", DINOv3, v3, needs_masks=True,
        training={"no_decay_rule": "dinov3", "clip_mode": "per_module", "freeze_last_layer_mode": "zero_lr"},
        summary="DINOv3 (Siméoni et al. 2025): DINOv2 + registers + Gram anchoring",
        drop_path_uniform=True, drop_path_subset_above=0.0,
    ))


_register_builtins()
