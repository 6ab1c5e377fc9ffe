"""Export a trained backbone to safetensors + JSON metadata; load it back anywhere.

``<path>.safetensors`` holds the wrapped model's tensors under timm's own key names, so timm
loads it directly::

    timm.create_model(arch, pretrained=True, num_classes=0, **timm_kwargs,
                      pretrained_cfg_overlay=dict(file="<path>.safetensors"))

``<path>.json`` records the architecture, the kwargs to rebuild it, image and patch size, the
method and the training steps. Training-only tensors (the iBOT mask token) are dropped; register
tokens added by dinokit to a ViT built elsewhere are kept under ``dinokit.register_tokens``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dinokit.backbones import Backbone, build_backbone
from dinokit.weights import WeightsError, backbone_state_dict, load_backbone_weights, read_file

FORMAT = 1
EXTRA_PREFIX = "dinokit."


def _base(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def _from_run(source: Path, which: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    ckpt = source / "checkpoints" / "last.ckpt" if source.is_dir() else source
    obj = read_file(ckpt)
    meta = obj.get("dinokit") or {}
    config = meta.get("config") or {}
    if not config:
        raise WeightsError(f"{ckpt} is not a dinokit training checkpoint (no run config inside)")
    state = backbone_state_dict(obj, which)
    steps = obj.get("global_step")
    return state, {"config": config, "training_steps": int(steps) if steps is not None else None}


def _timm_kwargs(model_cfg: dict[str, Any]) -> dict[str, Any]:
    kw = dict(model_cfg.get("backbone_kwargs") or {})
    name = model_cfg.get("backbone", "")
    if "vit" in name or "deit" in name or "eva" in name:
        kw.setdefault("dynamic_img_size", True)
        if model_cfg.get("n_registers"):
            kw.setdefault("reg_tokens", int(model_cfg["n_registers"]))
    if model_cfg.get("drop_path_rate"):
        kw.pop("drop_path_rate", None)
    return kw


def export_backbone(source: Any, path: str | Path, *, which: str = "teacher", method_name: str | None = None,
                    training_steps: int | None = None, timm_name: str | None = None,
                    timm_kwargs: dict[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json``; returns the safetensors path.

    ``source``: a method module (its teacher or student backbone), a :class:`Backbone`, a training
    checkpoint or a run directory. For modules, ``timm_name``/``timm_kwargs`` describe how to
    rebuild the model (taken from the backbone when it was built from a timm name).
    """
    from safetensors.torch import save_file

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    meta: dict[str, Any] = {"format": FORMAT, "which": which}
    if isinstance(source, (str, Path)):
        state, info = _from_run(Path(source), which)
        m = info["config"]["model"]
        arch, kwargs = m["backbone"], _timm_kwargs(m)
        method_name = method_name or m.get("method")
        training_steps = training_steps if training_steps is not None else info["training_steps"]
    else:
        backbone: Backbone = getattr(source, f"{which}_backbone", source)
        if not isinstance(backbone, Backbone):
            raise TypeError(f"cannot export {type(source).__name__}: give a method, a Backbone, a checkpoint "
                            "or a run directory")
        model: nn.Module = backbone.model
        state = {k: v for k, v in model.state_dict().items()}
        extra = backbone.state_dict()
        if "register_tokens" in extra:
            state["register_tokens"] = extra["register_tokens"]
        arch = timm_name or backbone.timm_name or type(model).__name__
        kwargs = dict(timm_kwargs or {})
        if not kwargs and hasattr(model, "patch_embed"):
            kwargs = _vit_kwargs(model)
        method_name = method_name or type(source).__name__.lower()
        training_steps = training_steps if training_steps is not None else getattr(source, "step", None)
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k == "mask_token":
            continue
        key = EXTRA_PREFIX + k if k == "register_tokens" else k
        out[key] = v.detach().cpu().contiguous()
    base = _base(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(base.with_suffix(".safetensors")))
    patch = kwargs.get("patch_size")
    meta.update({
        "architecture": arch,
        "timm_kwargs": kwargs,
        "image_size": kwargs.get("img_size"),
        "patch_size": patch,
        "embed_dim": kwargs.get("embed_dim"),
        "num_registers": int(kwargs.get("reg_tokens", 0)),
        "method": method_name,
        "training_steps": training_steps,
        "dinokit_version": _version(),
    })
    base.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return base.with_suffix(".safetensors")


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
    from dinokit import __version__

    return __version__


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata beside an export."""
    meta_path = _base(path).with_suffix(".json")
    if not meta_path.is_file():
        raise WeightsError(f"no metadata file {meta_path} beside the export")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{meta_path} is not a dinokit export (format {meta.get('format')!r})")
    return meta


def load_backbone(path: str | Path, *, model: nn.Module | None = None, device: str = "cpu") -> Backbone:
    """Rebuild an exported backbone (timm architectures from the metadata; any other kind needs the
    module itself as ``model=``) and load its weights strictly."""
    import timm

    base = _base(path)
    meta = read_metadata(base)
    tensors = read_file(base.with_suffix(".safetensors"))
    extra = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    if model is None:
        if not timm.is_model(meta["architecture"]):
            raise WeightsError(f"{meta['architecture']!r} is not a timm architecture: pass the module "
                               "to load into as model=")
        model = timm.create_model(meta["architecture"], pretrained=False, num_classes=0,
                                  **meta["timm_kwargs"])
    n_extra = int(extra["register_tokens"].shape[1]) if "register_tokens" in extra else 0
    native = int(getattr(model, "num_reg_tokens", 0) or 0)
    backbone = build_backbone(model, num_registers=native + n_extra if n_extra else 0)
    if n_extra:
        state["register_tokens"] = extra["register_tokens"]
    load_backbone_weights(backbone, state, source=str(base.with_suffix(".safetensors")))
    return backbone.to(device).eval()
