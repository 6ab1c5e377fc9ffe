"""Backbones: timm ViTs, timm/torchvision CNNs or any ``nn.Module`` behind one interface."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torchvision
from torch import nn

from dinokit.backbones.base import Backbone, BackboneOutput, check_crop_sizes
from dinokit.backbones.eva import EvaBackbone, is_timm_eva
from dinokit.backbones.generic import ModuleBackbone, use_channels_last
from dinokit.backbones.vit import ViTBackbone, is_timm_vit

__all__ = [
    "SUPPORTED_FAMILIES",
    "Backbone",
    "BackboneArgumentError",
    "BackboneError",
    "BackboneOutput",
    "EvaBackbone",
    "ModuleBackbone",
    "UnknownBackboneError",
    "ViTBackbone",
    "build_backbone",
    "check_crop_sizes",
    "is_timm_eva",
    "is_timm_vit",
    "use_channels_last",
]

#: What dinokit can drive, as told to a user whose model is none of these.
SUPPORTED_FAMILIES = (
    "timm ViTs (vit_*, deit*, DINOv2: *_patch14_dinov2, *_reg4_dinov2); "
    "timm Eva ViTs with rotary embeddings (DINOv3: *_patch16_dinov3[_qkvb], eva02_*); "
    "timm CNNs with a [B, C, H, W] feature map (convnext_*, resnet*, efficientnet_*, regnet*, ...); "
    "torchvision/<name>; or any nn.Module returning [B, D], [B, T, D] or [B, D, H, W]"
)

_TORCHVISION_PREFIX = "torchvision/"


class BackboneError(ValueError):
    """A backbone that cannot be built as asked; the message names the model and the cause."""


class UnknownBackboneError(BackboneError):
    """A model name that neither timm nor torchvision knows."""


class BackboneArgumentError(BackboneError):
    """Keyword arguments the named model does not take."""


def _create(builder: Any, name: str, kwargs: dict[str, Any], **kw: Any) -> nn.Module:
    """``builder(name, **kwargs, **kw)``; an argument the model does not take becomes a
    :class:`BackboneArgumentError` naming it."""
    try:
        return builder(name, **kwargs, **kw)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise BackboneArgumentError(f"{name} does not take the arguments {kwargs}: {e}") from None
_CLASSIFIER_ATTRS = ("fc", "classifier", "head", "heads")


def _strip_classifier(model: nn.Module) -> nn.Module:
    """Replace a torchvision classifier (``fc``, ``classifier``, ``heads``) by identity."""
    for attr in _CLASSIFIER_ATTRS:
        if isinstance(getattr(model, attr, None), (nn.Linear, nn.Sequential)):
            setattr(model, attr, nn.Identity())
            return model
    return model


def _timm_model(name: str, pretrained: bool, num_registers: int, kwargs: dict[str, Any]) -> nn.Module:
    if not timm.list_models(name) and not timm.is_model(name) and not name.startswith("hf"):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6) or \
            timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise UnknownBackboneError(f"unknown timm model name {name!r}; similar names: {close}")
    family = timm_family(name)
    kw: dict[str, Any] = {"num_classes": 0, "pretrained": pretrained, **kwargs}
    if family in ("vision_transformer", "eva") or "vit" in name or "deit" in name:
        kw.setdefault("dynamic_img_size", True)
        if num_registers and family == "eva":
            if not pretrained:
                kw.setdefault("num_reg_tokens", num_registers)
        elif num_registers:
            kw.setdefault("reg_tokens", num_registers)
    try:
        model = timm.create_model(name, **kw)
    except TypeError as e:
        if "dynamic_img_size" in str(e) and "dynamic_img_size" not in kwargs:
            kw.pop("dynamic_img_size")
            ours = {k: v for k, v in kw.items() if k not in kwargs}
            model = _create(timm.create_model, name, kwargs, **ours)
        elif "argument" in str(e):
            raise BackboneArgumentError(f"{name} does not take the arguments {kwargs}: {e}") from None
        else:
            raise
    # What rebuilds this exact architecture (export records it).
    model._dinokit_kwargs = {k: v for k, v in kw.items() if k not in ("pretrained", "num_classes")}
    return model


def timm_family(name: str) -> str | None:
    """The timm module that defines ``name`` ("vision_transformer", "eva", "convnext", ...)."""
    try:
        fn = timm.models.model_entrypoint(name)
    except Exception:
        return None
    return fn.__module__.rsplit(".", 1)[-1]


def _wrap_timm(model: nn.Module, name: str | None) -> Backbone:
    """The Backbone class for a timm model, or a clear error for families dinokit cannot drive."""
    if is_timm_eva(model):
        backbone: Backbone = EvaBackbone(model, timm_name=name)
    elif is_timm_vit(model):
        backbone = ViTBackbone(model, timm_name=name)
    elif hasattr(model, "patch_embed"):
        raise ValueError(
            f"{name or type(model).__name__} ({type(model).__name__}) is a transformer family dinokit "
            f"cannot drive (no CLS/patch/register split, no mask token); supported: {SUPPORTED_FAMILIES}"
        )
    else:
        backbone = ModuleBackbone(model, timm_name=name)
        width = getattr(backbone, "patch_width", None)
        if width is not None and width != backbone.embed_dim:
            raise ValueError(
                f"{name or type(model).__name__}: its feature map is not [B, C, H, W] (patch features "
                f"of width {width} for an embedding of {backbone.embed_dim}); supported: {SUPPORTED_FAMILIES}"
            )
    kw = getattr(model, "_dinokit_kwargs", None)
    backbone.timm_kwargs = dict(kw) if kw is not None else None
    return backbone


def build_backbone(
    encoder: str | nn.Module | Backbone,
    *,
    pretrained: bool = False,
    num_registers: int = 0,
    encoder_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """Turn a model name or module into a :class:`Backbone`.

    Args:
        encoder: a timm model name (``"vit_small_patch16_224"``, ``"resnet50"``; ViTs get
            ``dynamic_img_size=True``), ``"torchvision/<name>"`` for a torchvision model, an
            ``nn.Module`` (a timm ViT, a CNN or anything returning ``[B, D]``/``[B, T, D]``/
            ``[B, D, H, W]``), or an existing :class:`Backbone` (returned as is).
        pretrained: load the published weights (needs network or a local hub cache).
        num_registers: register tokens for ViTs (timm's ``reg_tokens`` for names; added tokens
            for a ViT module built without them).
        encoder_kwargs: extra keyword arguments for ``timm.create_model`` or the torchvision
            builder (``img_size``, ``drop_path_rate``, ``in_chans``, ...).
    """
    kwargs = dict(encoder_kwargs or {})
    if isinstance(encoder, Backbone):
        if num_registers and encoder.num_registers != num_registers:
            raise ValueError(
                f"num_registers={num_registers} but the given backbone has {encoder.num_registers}"
            )
        return encoder
    if isinstance(encoder, str):
        if encoder.startswith(_TORCHVISION_PREFIX):
            name = encoder[len(_TORCHVISION_PREFIX) :]
            if name not in torchvision.models.list_models():
                raise UnknownBackboneError(f"unknown torchvision model {name!r}")
            weights = "DEFAULT" if pretrained else None
            model = _strip_classifier(_create(torchvision.models.get_model, name, kwargs, weights=weights))
            if num_registers:
                raise ValueError("num_registers needs a timm ViT, not a torchvision model")
            return ModuleBackbone(model)
        model = _timm_model(encoder, pretrained, num_registers, kwargs)
        backbone = _wrap_timm(model, encoder)
        if num_registers and not isinstance(backbone, ViTBackbone):
            raise ValueError(f"num_registers={num_registers} needs a ViT; {encoder!r} is not one")
        if num_registers and backbone.num_registers != num_registers:
            raise ValueError(
                f"num_registers={num_registers} but {encoder!r} has {backbone.num_registers} register "
                "(storage) tokens; set backbone.n_registers to match the published model"
            )
        return backbone
    if not isinstance(encoder, nn.Module):
        raise TypeError(
            f"encoder must be a model name, an nn.Module or a Backbone, got {type(encoder).__name__}"
        )
    if is_timm_eva(encoder):
        if num_registers and EvaBackbone(encoder).num_registers != num_registers:
            raise ValueError(f"num_registers={num_registers} does not match the Eva model's register tokens")
        return EvaBackbone(encoder)
    if is_timm_vit(encoder):
        have = int(getattr(encoder, "num_reg_tokens", 0) or 0)
        extra = max(0, num_registers - have) if num_registers else 0
        return ViTBackbone(encoder, extra_registers=extra)
    if num_registers:
        raise ValueError(f"num_registers={num_registers} needs a ViT; got {type(encoder).__name__}")
    return ModuleBackbone(encoder)
