"""Export a trained backbone so that timm, the Hugging Face Hub and dinokit load it unchanged.

Two forms, both holding the wrapped model's tensors under timm's own key names:

* a **folder** (:func:`export_timm_folder`): ``config.json`` + ``model.safetensors`` in timm's
  Hub layout (architecture, the arguments that rebuild it, and the preprocessing: mean, std, input
  size), plus ``dinokit.json``. ``timm.create_model("local-dir:<folder>", pretrained=True)``
  gives the trained backbone; the same folder can be pushed to the Hub as it is.
* a **single file** (:func:`export_backbone`): ``<path>.safetensors`` + ``<path>.json``::

      timm.create_model(arch, pretrained=True, num_classes=0, **timm_kwargs,
                        pretrained_cfg_overlay=dict(file="<path>.safetensors"))

The teacher is exported unless ``which="student"``. Training-only tensors (the iBOT mask token)
are dropped; register tokens added by dinokit to a ViT built elsewhere are kept under
``dinokit.register_tokens`` (single file only: timm has no place for them).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.models import save_for_hf
from torch import Tensor, nn

from dinokit.atomic import atomic_folder, atomic_paths
from dinokit.backbones import Backbone, build_backbone
from dinokit.config import from_dict, upgrade_saved
from dinokit.data.preprocessing import Preprocessing
from dinokit.methods.distill import DEFAULT_STUDENT, student_backbone_settings
from dinokit.methods.registry import make_backbone, method_spec
from dinokit.methods.teacher_file import method_settings
from dinokit.train.build import build_method, build_preprocessing
from dinokit.weights import (
    WeightsError,
    backbone_state_dict,
    describe,
    load_backbone_weights,
    read_file,
    read_training_checkpoint,
)

FORMAT = 1
EXTRA_PREFIX = "dinokit."
META_NAME = "dinokit.json"
#: What an export folder holds (timm's Hub layout plus dinokit's metadata and a model card).
EXPORT_FOLDER_FILES = frozenset({"config.json", "model.safetensors", "pytorch_model.bin", META_NAME,
                                 "README.md"})


class NotTimmLoadableError(WeightsError):
    """The backbone cannot be written as a timm folder (not a timm model, or dinokit-added registers)."""


@dataclass
class _Export:
    """A backbone to export and what travels with it."""

    backbone: Backbone
    arch: str
    kwargs: dict[str, Any]
    method: str | None
    steps: int | None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    which: str | None = None  # what was exported when it is not what was asked (a distillation's student)


def _base(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def run_preprocessing(config: dict[str, Any]) -> dict[str, Any]:
    """The run's :class:`~dinokit.data.preprocessing.Preprocessing` as a dict (mean, std, channels,
    input size, crop fraction, interpolation), rebuilt from its stored config."""
    return build_preprocessing(from_dict(config)).to_dict()


def _run_backbone(config: dict[str, Any]) -> tuple[Backbone, dict[str, Any]]:
    """The backbone a run's config describes, built exactly as its method built it."""
    b, spec = config["backbone"], method_spec(config["model"].get("method", "dino"))
    kwargs = dict(b.get("kwargs") or {})
    n_reg = b.get("n_registers")
    n_reg = int(spec.official.get("backbone.n_registers", 0) if n_reg is None else n_reg)
    backbone = build_backbone(b["name"], num_registers=n_reg, encoder_kwargs=kwargs)
    if spec.needs_masks:
        backbone.enable_mask_token()
    return backbone, kwargs


def _resolve(source: Any, which: str, *, timm_name: str | None, timm_kwargs: dict[str, Any] | None,
             preprocessing: dict[str, Any] | None) -> _Export:
    if which not in ("teacher", "student") and not which.startswith("student:"):
        raise ValueError(f"which must be 'teacher', 'student' or 'student:<name>', got {which!r}")
    if isinstance(source, (str, Path)):
        src = Path(source)
        ckpt = src / "checkpoints" / "last.ckpt" if src.is_dir() else src
        obj = read_training_checkpoint(ckpt)
        config = upgrade_saved(obj["dinokit"]["config"])
        if method_spec(config["model"].get("method", "dino")).deploys == "student":
            backbone = _distilled_student(config, obj, which, str(ckpt))
            steps = obj.get("global_step")
            name = _student_name(config, which)
            arch = backbone.timm_name or student_backbone_settings(method_settings(config), name).name
            return _Export(backbone, arch, _kwargs_of(backbone), config["model"].get("method"),
                           int(steps) if steps is not None else None,
                           {**run_preprocessing(config), **(preprocessing or {})}, which=f"student:{name}")
        if which.startswith("student:"):
            raise WeightsError(f"{ckpt}: {which!r} names a student of a distillation run; this is a "
                               f"{config['model'].get('method', 'dino')} run (its student: 'student')")
        state = backbone_state_dict(obj, which)
        backbone, _ = _run_backbone(config)
        try:
            load_backbone_weights(backbone, state, source=str(ckpt))
        except WeightsError:  # the method builds its backbone another way: build the method itself
            cfg = from_dict(config)
            cfg.model.init_weights = cfg.gram.teacher_path = None  # the checkpoint has the weights
            backbone = getattr(build_method(cfg), f"{which}_backbone")
            load_backbone_weights(backbone, state, source=str(ckpt))
        steps = obj.get("global_step")
        return _Export(backbone, config["backbone"]["name"], _kwargs_of(backbone),
                       config["model"].get("method"), int(steps) if steps is not None else None,
                       {**run_preprocessing(config), **(preprocessing or {})})
    if which.startswith("student:") and hasattr(source, "students"):
        backbone = source.students[which.split(":", 1)[1]]["backbone"]
    elif which == "teacher" and hasattr(source, "deployed_backbone"):  # a distillation gives its student
        backbone = source.deployed_backbone
    else:
        backbone = getattr(source, f"{which}_backbone", source)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"cannot export {type(source).__name__}: give a method, a Backbone, a checkpoint "
                        "or a run directory")
    timm_arch = (getattr(backbone.model, "pretrained_cfg", None) or {}).get("architecture")
    arch = timm_name or backbone.timm_name or timm_arch or type(backbone.model).__name__
    kwargs = dict(timm_kwargs) if timm_kwargs is not None else _kwargs_of(backbone)
    method = type(source).__name__.lower() if source is not backbone else None
    pre = dict(preprocessing or getattr(backbone, "preprocessing", None) or {})
    if not pre:
        pre = _model_preprocessing(backbone)
    return _Export(backbone, arch, kwargs, method, getattr(source, "step", None), pre)


def _student_name(config: dict[str, Any], which: str) -> str:
    """The student ``which`` names in a distillation run (``student`` or ``teacher``: the first)."""
    if which.startswith("student:"):
        return which.split(":", 1)[1]
    students = config["model"].get("students") or []
    return students[0]["name"] if students else DEFAULT_STUDENT


def _distilled_student(config: dict[str, Any], obj: dict[str, Any], which: str, source: str) -> Backbone:
    """A distillation run's student backbone with its trained weights; the teacher, the run's
    input, is never what a distillation exports."""
    name = _student_name(config, which)
    settings = method_settings(config)
    try:
        b = student_backbone_settings(settings, name if config["model"].get("students") else None)
    except KeyError as e:
        raise WeightsError(f"{source}: {e.args[0]}") from None
    backbone = make_backbone(method_spec("distill"), b)
    prefix = f"method.students.{name}.backbone."
    state = {k[len(prefix):]: v for k, v in (obj.get("state_dict") or {}).items() if k.startswith(prefix)}
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    load_backbone_weights(backbone, state, source=source)
    return backbone


def _kwargs_of(backbone: Backbone) -> dict[str, Any]:
    """The arguments that rebuild the backbone's timm model (recorded when it was built)."""
    model = backbone.model
    if backbone.timm_kwargs is not None:
        return dict(backbone.timm_kwargs)
    recorded = getattr(model, "_model_args", None)
    if recorded:
        return {k: v for k, v in recorded.items() if k not in ("num_classes", "pretrained")}
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        return _vit_kwargs(model)
    return {}


def _model_preprocessing(backbone: Backbone) -> dict[str, Any]:
    cfg = getattr(backbone.model, "pretrained_cfg", None) or {}
    chans = backbone.in_chans or 3
    mean, std = list(cfg.get("mean", (0.485, 0.456, 0.406))), list(cfg.get("std", (0.229, 0.224, 0.225)))
    if len(mean) != chans:
        mean, std = [sum(mean) / len(mean)] * chans, [sum(std) / len(std)] * chans
    size = (cfg.get("input_size") or (chans, 224, 224))[-1]
    return {"mean": mean, "std": std, "channels": chans, "input_size": int(size),
            "crop_fraction": float(cfg.get("crop_pct") or 0.875),
            "interpolation": cfg.get("interpolation", "bicubic")}


def _metadata(e: _Export, which: str) -> dict[str, Any]:
    kw = e.kwargs
    size = kw.get("img_size")
    return {
        "format": FORMAT,
        "which": e.which or which,
        "architecture": e.arch,
        "timm_kwargs": kw,
        "image_size": size[0] if isinstance(size, (list, tuple)) else size,
        "patch_size": e.backbone.patch_size,
        "embed_dim": e.backbone.embed_dim,
        "num_registers": e.backbone.num_registers,
        "preprocessing": e.preprocessing,
        "method": e.method,
        "training_steps": e.steps,
        "dinokit_version": _version(),
    }


def export_backbone(source: Any, path: str | Path, *, which: str = "teacher", method_name: str | None = None,
                    training_steps: int | None = None, timm_name: str | None = None,
                    timm_kwargs: dict[str, Any] | None = None,
                    preprocessing: dict[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json``; returns the safetensors path.

    ``source``: a method module (its teacher or student backbone), a :class:`Backbone`, a training
    checkpoint or a run directory. The arguments that rebuild the model are those it was built
    with (``timm_kwargs`` overrides them); ``preprocessing`` (``mean``, ``std``, ``input_size``)
    defaults to the run's or the model's.
    """
    e = _resolve(source, which, timm_name=timm_name, timm_kwargs=timm_kwargs, preprocessing=preprocessing)
    e.method = method_name or e.method
    e.steps = training_steps if training_steps is not None else e.steps
    state = dict(e.backbone.model.state_dict())
    extra = e.backbone.state_dict()
    if "register_tokens" in extra:
        state[EXTRA_PREFIX + "register_tokens"] = extra["register_tokens"]
    out = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    base = _base(path)
    with atomic_paths([base.with_suffix(".safetensors"), base.with_suffix(".json")]) as (weights, meta):
        safetensors.torch.save_file(out, str(weights))
        meta.write_text(json.dumps(_metadata(e, which), indent=2))
    return base.with_suffix(".safetensors")


def export_timm_folder(source: Any, folder: str | Path, *, which: str = "teacher",
                       preprocessing: dict[str, Any] | None = None) -> Path:
    """Write ``folder/config.json`` + ``folder/model.safetensors`` (timm's Hub layout) and
    ``folder/dinokit.json``; ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads it.

    Raises :class:`WeightsError` for backbones timm cannot rebuild (non-timm modules, register
    tokens added by dinokit): use :func:`export_backbone` for those.

    The folder is built beside ``folder`` under a temporary name and renamed once complete, so an
    interrupted export never leaves a half-written folder. An earlier export folder of that name
    (only export files in it) is replaced in one step; any other existing folder is refused
    (``FileExistsError``) rather than overwritten.
    """
    e = _resolve(source, which, timm_name=None, timm_kwargs=None, preprocessing=preprocessing)
    model = e.backbone.model
    built_by_timm = getattr(model, "_model_args", None) is not None or e.backbone.timm_kwargs is not None
    if e.backbone.timm_name is None and not built_by_timm:
        raise NotTimmLoadableError(
            f"a timm folder needs a timm model built from a name; {type(model).__name__} is not one: use "
            "export_backbone (single file) and load it with model=")
    if e.backbone.state_dict().get("register_tokens") is not None:
        raise NotTimmLoadableError(
            "this ViT has register tokens added by dinokit, which timm cannot rebuild; build it with "
            "reg_tokens=... or use export_backbone (single file)")
    if not hasattr(model, "pretrained_cfg"):
        raise NotTimmLoadableError(f"{type(model).__name__} is not a timm model: use export_backbone "
                                   "(single file)")
    out = Path(folder)
    _check_replaceable(out)
    pre = e.preprocessing
    chans = int(pre.get("channels") or e.backbone.in_chans or 3)
    data_config = {"mean": tuple(pre["mean"]), "std": tuple(pre["std"]),
                   "input_size": (chans, int(pre["input_size"]), int(pre["input_size"])),
                   "interpolation": pre.get("interpolation", "bicubic"),
                   "crop_pct": float(pre.get("crop_fraction") or 0.875), "crop_mode": "center"}
    model_args = {k: v for k, v in e.kwargs.items() if k not in ("pretrained", "num_classes")}
    if any(not p.is_contiguous() for p in model.parameters()):  # a channels-last CNN: saved contiguous
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    with atomic_folder(out) as tmp:
        save_for_hf(model, str(tmp), model_args=model_args, safe_serialization=True, data_config=data_config)
        (tmp / META_NAME).write_text(json.dumps(_metadata(e, which), indent=2))
    return out


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier export folder."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; choose another export path")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FOLDER_FILES)
        if foreign:
            raise FileExistsError(f"{folder} exists and is not an export folder (it holds {foreign[:3]}); "
                                  "choose another export path")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file of an export; a damaged one fails naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path} is not valid JSON ({err}): the export is damaged; export it "
                           "again") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} holds a JSON {type(data).__name__}, not an export's metadata object")
    return data


def _vit_kwargs(model: nn.Module) -> dict[str, Any]:
    pe = model.patch_embed
    size = pe.img_size[0] if isinstance(pe.img_size, (tuple, list)) else pe.img_size
    patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
    kw = {"img_size": int(size), "patch_size": int(patch), "embed_dim": int(model.embed_dim),
          "depth": len(model.blocks), "num_heads": int(model.blocks[0].attn.num_heads),
          "in_chans": int(pe.proj.in_channels), "dynamic_img_size": bool(model.dynamic_img_size)}
    if getattr(model, "num_reg_tokens", 0):
        kw["reg_tokens"] = int(model.num_reg_tokens)
    return kw


def _version() -> str:
    from dinokit import __version__  # the package imports this module: read its version at call time

    return __version__


def _export_path(path: str | Path) -> Path:
    """``path``, or the export folder when ``path`` is its ``model.safetensors`` (with no
    ``model.json`` beside it): the folder's ``config.json`` describes that file."""
    p = Path(path)
    in_folder = p.name == "model.safetensors" and (p.parent / "config.json").is_file()
    if in_folder and p.is_file() and not _base(p).with_suffix(".json").is_file():
        return p.parent
    return p


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an export: ``<path>.json`` beside a single file, or a folder's
    ``dinokit.json`` (for a timm folder without one, what its ``config.json`` says); the weights
    file inside a folder gives the folder's."""
    p = _export_path(path)
    if p.is_dir():
        if (p / META_NAME).is_file():
            return _read_json(p / META_NAME)
        if not (p / "config.json").is_file():
            raise WeightsError(f"{p} is not an export folder (no config.json)")
        cfg = _read_json(p / "config.json")
        pc = cfg.get("pretrained_cfg", {})
        size = (pc.get("input_size") or [3, 224, 224])
        return {"format": FORMAT, "architecture": cfg.get("architecture"),
                "timm_kwargs": cfg.get("model_args", {}),
                "preprocessing": {"mean": pc.get("mean"), "std": pc.get("std"), "channels": size[0],
                                  "input_size": size[-1], "crop_fraction": pc.get("crop_pct", 0.875),
                                  "interpolation": pc.get("interpolation", "bicubic")}}
    meta_path = _base(p).with_suffix(".json")
    if not meta_path.is_file():
        if p.is_file():
            raise WeightsError(f"{p} holds {describe(read_file(p))}, with no metadata file {meta_path.name} "
                               "beside it; expected a dinokit export (dinokit export writes one)")
        raise WeightsError(f"no metadata file {meta_path} beside the export")
    meta = _read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{meta_path} is not a dinokit export (format {meta.get('format')!r})")
    return meta


def load_backbone(path: str | Path, *, model: nn.Module | None = None, device: str = "cpu") -> Backbone:
    """Rebuild an exported backbone (a folder or a single file; timm architectures from the
    metadata, any other kind needs the module itself as ``model=``) and load its weights strictly.

    The export's preprocessing (``mean``, ``std``, ``input_size``, ``channels``) is attached as
    ``backbone.preprocessing``.
    """
    p = _export_path(path)
    meta = read_metadata(p)
    if p.is_dir():
        if model is None:
            _read_json(p / "config.json")  # timm reads it next: a damaged one is named here
            model = timm.create_model(f"local-dir:{p.resolve()}", pretrained=True)
            backbone = build_backbone(model)
        else:
            backbone = build_backbone(model)
            load_backbone_weights(backbone, read_file(p / "model.safetensors"), source=str(p))
        backbone.timm_name = meta.get("architecture")
    else:
        base = _base(p)
        tensors = read_file(base.with_suffix(".safetensors"))
        extra = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
        state: dict[str, Tensor] = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
        if model is None:
            if not timm.is_model(meta["architecture"]):
                raise WeightsError(f"{meta['architecture']!r} is not a timm architecture: pass the module "
                                   "to load into as model=")
            model = timm.create_model(meta["architecture"], pretrained=False, num_classes=0,
                                      **meta["timm_kwargs"])
        n_extra = int(extra["register_tokens"].shape[1]) if "register_tokens" in extra else 0
        native = int(getattr(model, "num_reg_tokens", 0) or 0)
        backbone = build_backbone(model, num_registers=native + n_extra if n_extra else 0)
        backbone.timm_name = meta.get("architecture")
        if n_extra:
            state["register_tokens"] = extra["register_tokens"]
        load_backbone_weights(backbone, state, source=str(base.with_suffix(".safetensors")))
    backbone.timm_kwargs = dict(meta.get("timm_kwargs") or {})
    backbone.preprocessing = meta.get("preprocessing") or _old_export_preprocessing(meta, backbone)
    return backbone.to(device).eval()


def _old_export_preprocessing(meta: dict[str, Any], backbone: Backbone) -> dict[str, Any]:
    """Exports written before the preprocessing was stored: the crop preset for their size."""
    size = meta.get("image_size")
    if not size:
        return _model_preprocessing(backbone)
    return Preprocessing.default_for(int(size), int(backbone.in_chans or 3)).to_dict()


def eval_transform(preprocessing: dict[str, Any]) -> Any:
    """The deterministic eval view of an export's preprocessing (resize, centre crop, normalise)."""
    return Preprocessing.from_dict(dict(preprocessing)).eval_transform()
