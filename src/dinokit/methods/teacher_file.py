"""The frozen teacher of a distillation, read from what a user has: a dinokit run (its EMA teacher
with its DINO and iBOT heads), a file of the official DINOv2/DINOv3 training code (the same), a
dinokit export, or published backbone weights.

The teacher comes back as an ``nn.ModuleDict`` with ``backbone`` (a
:class:`~dinokit.backbones.Backbone`) and, from a training run, the heads it was trained with
(``head``, and ``patch_head`` for DINOv2/DINOv3 runs): the DINOv3-style objective needs them, the
feature objective only the backbone. Nothing in a file is executed (``weights_only=True`` or
safetensors), and every tensor is checked against the rebuilt network before it is copied.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

from dinokit.backbones import Backbone, build_backbone
from dinokit.heads import DINOHead
from dinokit.methods.base import SelfDistillationMethod
from dinokit.methods.registry import build_method
from dinokit.settings import DistillationSettings, MethodSettings
from dinokit.weights import (
    WeightsError,
    backbone_state_dict,
    describe,
    fit_problems,
    kind_of,
    load_backbone_weights,
    read_file,
)

#: What a teacher may be given as, in Python.
TeacherSource = str | Path | nn.ModuleDict | SelfDistillationMethod | nn.Module


def read_teacher(source: TeacherSource, distillation: DistillationSettings | None = None) -> nn.ModuleDict:
    """The teacher networks (``backbone`` and any heads), in eval mode without gradients.

    ``source``: a run directory or training checkpoint of dinokit (backbone + heads), a dinokit
    export (a timm folder, or ``.safetensors`` with its ``.json``), backbone weights in timm or
    Meta's DINOv2/DINOv3 layout (``distillation.teacher_backbone`` names the architecture; an
    official training file brings the teacher's heads too, :func:`official_heads`), a method (its
    teacher), an ``nn.ModuleDict`` with ``backbone``, or any backbone module.
    """
    d = distillation or DistillationSettings()
    if isinstance(source, SelfDistillationMethod):
        nets = nn.ModuleDict(dict(source.teacher.items()))
    elif isinstance(source, nn.ModuleDict):
        if "backbone" not in source:
            raise ValueError(f"a teacher ModuleDict needs a 'backbone', got keys {list(source)}")
        nets = source
    elif isinstance(source, nn.Module):
        nets = nn.ModuleDict({"backbone": build_backbone(source)})
    else:
        nets = _read_path(Path(source), d)
    for m in nets.modules():  # the teacher sees clean features: no stochastic depth
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    nets.requires_grad_(False)
    return nets.eval()


def _read_path(path: Path, d: DistillationSettings) -> nn.ModuleDict:
    if not path.exists():
        raise WeightsError(f"model.teacher: {str(path)!r} does not exist")
    if path.is_dir():
        if (path / "checkpoints" / "last.ckpt").is_file():
            return _from_run(path / "checkpoints" / "last.ckpt")
        if (path / "config.json").is_file():
            model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True, num_classes=0)
            return nn.ModuleDict({"backbone": build_backbone(model)})
        raise WeightsError(f"model.teacher: {path} is neither a dinokit run directory "
                           "(checkpoints/last.ckpt) nor an export folder (config.json)")
    meta = path.with_suffix(".json")
    if path.suffix == ".safetensors" and meta.is_file():
        return nn.ModuleDict({"backbone": _from_export_file(path, meta)})
    obj = read_file(path)
    if kind_of(obj) == "dinokit_checkpoint":
        return _from_checkpoint(obj, str(path))
    if not d.teacher_backbone:
        raise WeightsError(f"model.teacher: {path} holds {describe(obj)}; name its architecture with "
                           "distillation.teacher_backbone=<timm name> (and distillation.teacher_kwargs)")
    heads = official_heads(obj, str(path))
    backbone = build_backbone(d.teacher_backbone, encoder_kwargs=dict(d.teacher_kwargs))
    load_backbone_weights(backbone, backbone_state_dict(obj, "teacher"), source=str(path))
    return nn.ModuleDict({"backbone": backbone, **heads})


#: The teacher's heads in an official DINOv2/DINOv3 training file -> their names here.
OFFICIAL_HEADS = {"dino_head.": "head", "ibot_head.": "patch_head"}


def official_heads(obj: Mapping[str, Any], source: str) -> dict[str, DINOHead]:
    """The EMA teacher's DINO and iBOT heads of an official DINOv2/DINOv3 training file: the
    ``teacher_checkpoint.pth`` their training writes for evaluation (``{"teacher": ...}``) or a
    training checkpoint (``{"model": {"teacher.…": ...}}``); empty for anything else. Each head's
    architecture (layers, widths, batch norm, weight-normalised or plain prototypes) is read from
    its tensors. An iBOT head shared with the DINO head (DINOv2's default) gives no patch head."""
    if isinstance(obj.get("teacher"), Mapping):
        teacher = {k: v for k, v in obj["teacher"].items() if isinstance(v, Tensor)}
    else:
        inner = obj.get("model") if isinstance(obj.get("model"), Mapping) else obj
        teacher = {k[len("teacher."):]: v for k, v in inner.items()
                   if isinstance(v, Tensor) and k.startswith("teacher.")}
    heads: dict[str, DINOHead] = {}
    for prefix, name in OFFICIAL_HEADS.items():
        state = {k[len(prefix):]: v for k, v in teacher.items() if k.startswith(prefix)}
        if state:
            heads[name] = _official_head(state, f"{source}: the teacher's {prefix[:-1]}")
    if "patch_head" in heads and "head" not in heads:
        raise WeightsError(f"model.teacher: {source} has the teacher's ibot_head but no dino_head")
    return heads


def _official_head(state: dict[str, Tensor], source: str) -> DINOHead:
    state = {("mlp.0." + k[len("mlp."):] if k in ("mlp.weight", "mlp.bias") else k): v
             for k, v in state.items()}  # a 1-layer official head is a bare Linear
    state = {k.replace("last_layer.parametrizations.weight.original0", "last_layer.weight_g")
              .replace("last_layer.parametrizations.weight.original1", "last_layer.weight_v"): v
             for k, v in state.items()}  # torch.nn.utils.parametrizations.weight_norm's names
    linear = sorted(int(k.split(".")[1]) for k, v in state.items()
                    if k.startswith("mlp.") and k.endswith(".weight") and v.ndim == 2)
    prototypes = state.get("last_layer.weight_v", state.get("last_layer.weight"))
    if not linear or prototypes is None:
        raise WeightsError(f"model.teacher: {source} is not a DINO head (no mlp Linear or last_layer)")
    if any(f"mlp.{i}.bias" not in state for i in linear):
        raise WeightsError(f"model.teacher: {source} has Linear layers without biases (mlp_bias=False), "
                           "which dinokit's DINOHead does not build")
    first, last = state[f"mlp.{linear[0]}.weight"], state[f"mlp.{linear[-1]}.weight"]
    head = DINOHead(int(first.shape[1]), int(prototypes.shape[0]), hidden_dim=int(first.shape[0]),
                    bottleneck_dim=int(last.shape[0]), layers=len(linear),
                    batch_norm=any(k.endswith("running_mean") for k in state), norm_last_layer=False,
                    weight_norm="last_layer.weight_g" in state)
    problems = fit_problems(head, state)
    if problems:
        raise WeightsError(f"model.teacher: {source} does not fit a DINO head: " + "; ".join(problems))
    head.load_state_dict(state)
    return head


def _from_run(ckpt: Path) -> nn.ModuleDict:
    return _from_checkpoint(read_file(ckpt), str(ckpt))


def _from_export_file(path: Path, meta_path: Path) -> Backbone:
    meta = json.loads(meta_path.read_text())
    arch = meta.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise WeightsError(f"model.teacher: {meta_path} names no timm architecture ({arch!r})")
    tensors = read_file(path)
    if any(k.startswith("dinokit.") for k in tensors):
        raise WeightsError(f"model.teacher: {path} holds register tokens added by dinokit; give the run "
                           "directory instead")
    model = timm.create_model(arch, pretrained=False, num_classes=0, **(meta.get("timm_kwargs") or {}))
    backbone = build_backbone(model)
    load_backbone_weights(backbone, tensors, source=str(path))
    return backbone


def method_settings(config: Mapping[str, Any]) -> MethodSettings:
    """The method sections of a run's stored config as :class:`MethodSettings` (published
    weights never fetched: the checkpoint has the trained ones)."""
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(MethodSettings):
        cls = type(getattr(MethodSettings(), f.name))
        known = {x.name for x in dataclasses.fields(cls)}
        values = {k: v for k, v in (config.get(f.name) or {}).items() if k in known}
        sections[f.name] = cls(**values)
    sections["backbone"] = dataclasses.replace(sections["backbone"], pretrained=False)
    return MethodSettings(**sections)


def _from_checkpoint(obj: Mapping[str, Any], source: str) -> nn.ModuleDict:
    config = (obj.get("dinokit") or {}).get("config")
    if not isinstance(config, Mapping) or "backbone" not in config:
        raise WeightsError(f"model.teacher: {source} is a training checkpoint without its run config")
    name = (config.get("model") or {}).get("method", "dino")
    if name == "distill":
        raise WeightsError(f"model.teacher: {source} is a distillation run; export its student and give "
                           "that file as the teacher")
    method = build_method(name, method_settings(config))
    prefix = "method.teacher."
    tensors = obj.get("state_dict") or {}
    state: dict[str, Tensor] = {k[len(prefix):]: v for k, v in tensors.items()
                                if k.startswith(prefix) and isinstance(v, Tensor)}
    problems = fit_problems(method.teacher, state)
    if problems:
        raise WeightsError(f"model.teacher: {source}: its teacher does not fit the run's config: "
                           + "; ".join(problems))
    method.teacher.load_state_dict(state, strict=False)
    return nn.ModuleDict(dict(method.teacher.items()))
