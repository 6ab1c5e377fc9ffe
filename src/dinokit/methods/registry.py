"""The method registry: ``model.method`` names -> a small preset function that composes the method
from its settings, and what the rest of the library needs to know about it (its loss-term
sections, masks in the batch, the official choices of the settings left ``None`` and of the
optimiser's ``"auto"`` rules). The builder, the collate, config validation and logging read these
declarations.

Adding a method is one preset function decorated with :func:`register_method`::

    @register_method("mine", sections=("dino", "koleo"), official={"teacher.momentum": 0.996, ...})
    def mine(backbone, settings):
        return ComposedMethod(backbone, [DINOClsTerm(settings.dino, settings.heads, settings.teacher),
                                         KoLeoTerm(settings.koleo)], teacher=settings.teacher)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dinokit.backbones import Backbone, build_backbone, use_channels_last
from dinokit.backbones.stochastic_depth import set_uniform_drop_path
from dinokit.backbones.weight_init import apply_init, check_init
from dinokit.methods.base import SelfDistillationMethod
from dinokit.settings import BackboneSettings, MethodSettings

Preset = Callable[[Backbone, MethodSettings], SelfDistillationMethod]


@dataclass(frozen=True)
class MethodSpec:
    """How to build a method and how it is trained by default.

    Attributes:
        name: the ``model.method`` value.
        build: the preset: ``(backbone, resolved settings) -> method``.
        sections: the config sections of its loss terms (``dino``, ``ibot``, ``koleo``, ``gram``).
        official: ``"section.key" -> value`` for every setting whose ``None`` means "official".
        needs_masks: batches carry iBOT masks (the collate makes them).
        training: the official optimiser choices that ``"auto"`` (or ``None``) resolves to:
            ``no_decay_rule``, ``clip_mode``, ``freeze_last_layer_mode``, ``layer_decay``,
            ``patch_embed_lr_mult``, ``lr``, ``lr_scaling``, ``lr_reference_batch`` (DINO's
            where a method declares none: ``dinokit.train.step.DINO_RULES``).
        summary: one line for ``--help`` and errors.
        drop_path_uniform: the official per-block drop-path rates: all equal to the rate (DINOv2's
            ``drop_path_uniform: true``, DINOv3) or ``linspace(0, rate, depth)`` (DINO, iBOT).
        drop_path_subset_above: the official stochastic depth form: the subset form
            (:mod:`~dinokit.backbones.stochastic_depth`) for blocks whose rate is above this (DINOv3 0,
            DINOv2 0.1), timm's per-sample ``DropPath`` below; None = always ``DropPath`` (DINO, iBOT).
        temperature_endpoint: the teacher-temperature warm-up ends at its last index (DINO, DINOv2)
            or one index later (DINOv3's schedules).
        deploys: which network a run delivers (exports, embeds and monitors by default): the EMA
            ``teacher`` of self-distillation, or the ``student`` of a distillation.
    """

    name: str
    build: Preset
    sections: tuple[str, ...]
    official: Mapping[str, Any] = field(default_factory=dict)
    needs_masks: bool = False
    training: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    drop_path_uniform: bool = False
    drop_path_subset_above: float | None = None
    temperature_endpoint: bool = True
    deploys: str = "teacher"


#: The optimiser of DINOv2's and DINOv3's ``ssl_default_config.yaml`` (their multi-distillation
#: too): lr 0.004 per 1024 images scaled by the square root (DINOv2's ``base_lr: 0.004``; DINOv3
#: writes it ``lr: 0.001`` times ``4 * sqrt``), each ViT block's lr decayed by 0.9 per block below
#: the last and the patch embedding's times a further 0.2, blocks clipped per module, prototypes
#: frozen by a zero lr. Each method adds its own weight-decay rule.
DINOV2_TRAINING: Mapping[str, Any] = {
    "clip_mode": "per_module", "freeze_last_layer_mode": "zero_lr", "layer_decay": 0.9,
    "patch_embed_lr_mult": 0.2, "lr": 0.004, "lr_scaling": "sqrt", "lr_reference_batch": 1024}

METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, **declarations: Any) -> Callable[[Preset], Preset]:
    """Decorator: register a preset function under ``name`` with its :class:`MethodSpec`
    declarations."""

    def register(build: Preset) -> Preset:
        spec = MethodSpec(name, build, **declarations)
        if name in METHODS and METHODS[name].build is not build:
            raise ValueError(f"a method named {name!r} is already registered")
        METHODS[name] = spec
        return build

    return register


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def resolve_settings(spec: MethodSpec, settings: MethodSettings) -> MethodSettings:
    """``settings`` with every ``None`` the method declares an official value for filled in."""
    sections: dict[str, Any] = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    for key, value in spec.official.items():
        section, name = key.split(".")
        if getattr(sections[section], name) is None:
            sections[section] = dataclasses.replace(sections[section], **{name: value})
    return MethodSettings(**sections)


def build_method(name: str, settings: MethodSettings | None = None,
                 backbone: Backbone | nn.Module | str | None = None) -> SelfDistillationMethod:
    """The method ``name`` from its settings; the backbone from ``settings.backbone`` unless given
    (a :class:`~dinokit.backbones.Backbone`, any ``nn.Module`` or a timm name)."""
    spec = method_spec(name)
    s = resolve_settings(spec, settings or MethodSettings())
    return spec.build(make_backbone(spec, s.backbone, backbone), s)


def make_backbone(spec: MethodSpec, b: BackboneSettings,
                  given: Backbone | nn.Module | str | None = None) -> Backbone:
    """The student backbone of ``spec`` from its (resolved) settings: registers, weight
    initialisation, stochastic depth in the method's official form, packed crops, channels-last
    memory format."""
    kwargs = dict(b.kwargs)
    if b.drop_path_rate:
        kwargs.setdefault("drop_path_rate", b.drop_path_rate)
    check_init(b.init, pretrained=b.pretrained)
    backbone = build_backbone(b.name if given is None else given, pretrained=b.pretrained,
                              num_registers=b.n_registers or 0, encoder_kwargs=kwargs)
    apply_init(backbone, b.init)
    backbone.packed_crops = {"true": True, "false": False}.get(b.packed_crops, "auto")
    configure_stochastic_depth(spec, backbone, b, float(kwargs.get("drop_path_rate", 0.0)))
    if b.channels_last:
        use_channels_last(backbone)
    return backbone


def configure_stochastic_depth(spec: MethodSpec, backbone: Backbone, b: BackboneSettings,
                               rate: float) -> None:
    """``backbone.drop_path_uniform`` and ``backbone.drop_path_mode`` (``auto``/None: the method's
    official choice) applied to a student backbone built with drop-path ``rate``."""
    uniform = spec.drop_path_uniform if b.drop_path_uniform is None else b.drop_path_uniform
    blocks = getattr(getattr(backbone, "model", None), "blocks", None)
    if uniform and rate:
        if blocks is not None:
            set_uniform_drop_path(blocks, rate)
        elif b.drop_path_uniform:
            raise ValueError("backbone.drop_path_uniform: the backbone has no ViT blocks to give one rate")
    supported = hasattr(backbone, "drop_path_mode")
    if b.drop_path_mode == "subset" and not supported:
        raise ValueError("backbone.drop_path_mode: 'subset' needs a timm ViT backbone, not "
                         f"{type(backbone).__name__} (use auto or sample)")
    above = {"auto": spec.drop_path_subset_above, "subset": 0.0, "sample": None}[b.drop_path_mode]
    if supported:
        backbone.drop_path_mode = "sample" if above is None else "subset"
        backbone.drop_path_subset_above = float(above or 0.0)


def official_rules(name: str) -> dict[str, Any]:
    """The method's official optimiser choices (:attr:`MethodSpec.training`)."""
    return dict(method_spec(name).training)
