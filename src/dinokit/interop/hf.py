"""Hugging Face ``transformers`` folders from dinokit ViTs: ``Dinov2Model``,
``Dinov2WithRegistersModel`` and ``DINOv3ViTModel``.

The timm ViT behind a :class:`~dinokit.backbones.Backbone` is mapped tensor by tensor onto the
``transformers`` class that computes the same function (the key names of transformers' own
modelling code: fused ``qkv`` split into query/key/value, LayerScale gains into ``lambda1``, ...),
loaded strictly and saved with ``save_pretrained``, with an image processor that repeats dinokit's
evaluation view (resize the short side, centre crop, mean/std of the run). Then::

    model = transformers.AutoModel.from_pretrained(folder)
    pipe = transformers.pipeline("image-feature-extraction", model=folder)

give dinokit's features: ``last_hidden_state[:, 0]`` is the CLS embedding, the registers follow it,
then the patches.

* timm ``VisionTransformer`` with a class token and an absolute position embedding (DINOv2 family:
  ``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``, any plain ViT dinokit trains) ->
  ``Dinov2WithRegistersModel`` when it has register tokens (timm's own or dinokit's), else
  ``Dinov2Model``. transformers resizes the position embedding for other image sizes with bicubic
  interpolation, with antialiasing for ``Dinov2WithRegistersModel`` (as timm) and without it for
  ``Dinov2Model``; so that a ``Dinov2Model`` gives dinokit's features at the run's input size, its
  position embedding is stored resampled (timm's way) to the run's input grid.
* timm ``Eva`` with DINOv3's rotary embedding (``vit_*_dinov3*``) -> ``DINOv3ViTModel``.

Anything else (CNNs, other rotary variants, SwiGLU DINOv2 giants) is refused with a
:class:`UnsupportedForHFError` naming the supported architectures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dinokit.backbones import Backbone
from dinokit.interop.extras import require
from dinokit.interop.staging import staged_folder
from dinokit.weights import WeightsError

SUPPORTED = ("DINOv2-family timm ViTs (vit_*_patch14_dinov2, vit_*_patch14_reg4_dinov2, plain timm "
             "VisionTransformers with a class token) -> Dinov2Model / Dinov2WithRegistersModel; DINOv3 "
             "ViTs (timm Eva vit_*_dinov3*) -> DINOv3ViTModel")
META_NAME = "dinokit.json"


class UnsupportedForHFError(WeightsError):
    """The backbone has no ``transformers`` counterpart dinokit can write."""


def _refuse(what: str) -> UnsupportedForHFError:
    return UnsupportedForHFError(f"--format hf cannot export {what}; supported: {SUPPORTED}")


def _is_identity(m: Any) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _act_name(act: nn.Module, allowed: dict[type, str]) -> str:
    for cls, name in allowed.items():
        if type(act) is cls and getattr(act, "approximate", "none") == "none":
            return name
    raise _refuse(f"a ViT whose MLP activation is {type(act).__name__}")


def _gain(ls: Any, dim: int) -> Tensor:
    """A LayerScale gain (timm ``ls1.gamma`` / Eva ``gamma_1``), ones where there is none."""
    if ls is None or isinstance(ls, nn.Identity):
        return torch.ones(dim)
    return (ls.gamma if hasattr(ls, "gamma") else ls).detach().clone()


def _square(x: Any) -> int:
    if isinstance(x, (tuple, list)):
        if len(set(x)) != 1:
            raise _refuse(f"a non-square patch or grid {tuple(x)}")
        return int(x[0])
    return int(x)


def _split_qkv(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = w.detach().chunk(3, dim=0)
    return q.clone(), k.clone(), v.clone()


# ------------------------------------------------------------------------------------ DINOv2
def _dinov2(backbone: Backbone, input_size: int) -> tuple[Any, dict[str, Tensor], str]:
    """(transformers config, state dict, class name) for a timm VisionTransformer."""
    from timm.layers import resample_abs_pos_embed

    t = require("transformers", "hf", "--format hf")
    m = backbone.model
    d = int(m.embed_dim)
    if getattr(m, "cls_token", None) is None or getattr(m, "pos_embed", None) is None:
        raise _refuse("a ViT without a class token or an absolute position embedding")
    pre_norms = (getattr(m, "norm_pre", None), getattr(m.patch_embed, "norm", None))
    if not all(_is_identity(n) for n in pre_norms):
        raise _refuse("a ViT with a pre-norm or a patch-embedding norm")
    native = int(getattr(m, "num_reg_tokens", 0) or 0)
    no_embed_class = bool(getattr(m, "no_embed_class", False))
    patch = _square(m.patch_embed.patch_size)
    grid = _square(m.patch_embed.grid_size)
    blocks = list(m.blocks)
    blk0 = blocks[0]
    for blk in blocks:
        a = blk.attn
        if not hasattr(a, "qkv") or not (_is_identity(a.q_norm) and _is_identity(a.k_norm)):
            raise _refuse("a ViT with q/k norms or split q/k/v projections")
        plain_mlp = hasattr(blk.mlp, "fc1") and not hasattr(blk.mlp, "fc1_g")
        if not _is_identity(getattr(a, "norm", None)) or not plain_mlp:
            raise _refuse("a ViT whose blocks are not plain pre-norm blocks with a GELU MLP "
                          "(e.g. SwiGLU DINOv2 giants)")
        if not _is_identity(getattr(blk.mlp, "norm", None)):
            raise _refuse("a ViT with a norm inside the MLP")
    hidden = int(blk0.mlp.fc1.out_features)
    if hidden % d:
        raise _refuse(f"a ViT whose MLP width {hidden} is not a whole multiple of {d}")
    registers = backbone.num_registers
    pos = m.pos_embed.detach()
    n_prefix_pos = 0 if no_embed_class else 1 + native
    cls_pos = pos[:, :1] if n_prefix_pos else torch.zeros(1, 1, d)
    # timm adds a fixed position to its own register tokens when they are embedded with the class
    # token (never resized): folded into the tokens, as transformers adds none to registers.
    reg_pos = pos[:, 1:n_prefix_pos] if n_prefix_pos else torch.zeros(1, native, d)
    patch_pos = pos[:, n_prefix_pos:]
    image_size = grid * patch
    if not registers and input_size != image_size and input_size % patch == 0:
        # Dinov2Model resizes without antialiasing (timm with it): store the run's input grid.
        new = input_size // patch
        patch_pos = resample_abs_pos_embed(patch_pos, (new, new), (grid, grid), num_prefix_tokens=0)
        image_size = input_size
    common = dict(hidden_size=d, num_hidden_layers=len(blocks), num_attention_heads=int(blk0.attn.num_heads),
                  mlp_ratio=hidden // d, hidden_act=_act_name(blk0.mlp.act, {nn.GELU: "gelu"}),
                  layer_norm_eps=float(m.norm.eps), image_size=image_size, patch_size=patch,
                  num_channels=int(m.patch_embed.proj.in_channels),
                  qkv_bias=blk0.attn.qkv.bias is not None, layerscale_value=1.0)
    if registers:
        config = t.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        name = "Dinov2WithRegistersModel"
    else:
        config = t.Dinov2Config(**common)
        name = "Dinov2Model"
    s: dict[str, Tensor] = {
        "embeddings.cls_token": m.cls_token.detach(),
        "embeddings.position_embeddings": torch.cat([cls_pos, patch_pos], dim=1),
        "embeddings.patch_embeddings.projection.weight": m.patch_embed.proj.weight.detach(),
        "embeddings.patch_embeddings.projection.bias": m.patch_embed.proj.bias.detach(),
        "layernorm.weight": m.norm.weight.detach(),
        "layernorm.bias": m.norm.bias.detach(),
    }
    mask = getattr(backbone, "mask_token", None)
    s["embeddings.mask_token"] = mask.detach().reshape(1, d) if mask is not None else torch.zeros(1, d)
    if registers:
        parts = []
        if native:
            parts.append(m.reg_token.detach() + reg_pos)
        if getattr(backbone, "register_tokens", None) is not None:
            parts.append(backbone.register_tokens.detach())
        s["embeddings.register_tokens"] = torch.cat(parts, dim=1)
    for i, blk in enumerate(blocks):
        p = f"encoder.layer.{i}."
        q, k, v = _split_qkv(blk.attn.qkv.weight)
        s.update({p + "attention.q_proj.weight": q, p + "attention.k_proj.weight": k,
                  p + "attention.v_proj.weight": v})
        if blk.attn.qkv.bias is not None:
            qb, kb, vb = _split_qkv(blk.attn.qkv.bias)
            s.update({p + "attention.q_proj.bias": qb, p + "attention.k_proj.bias": kb,
                      p + "attention.v_proj.bias": vb})
        s.update({
            p + "attention.o_proj.weight": blk.attn.proj.weight.detach(),
            p + "attention.o_proj.bias": blk.attn.proj.bias.detach(),
            p + "norm1.weight": blk.norm1.weight.detach(), p + "norm1.bias": blk.norm1.bias.detach(),
            p + "norm2.weight": blk.norm2.weight.detach(), p + "norm2.bias": blk.norm2.bias.detach(),
            p + "mlp.fc1.weight": blk.mlp.fc1.weight.detach(), p + "mlp.fc1.bias": blk.mlp.fc1.bias.detach(),
            p + "mlp.fc2.weight": blk.mlp.fc2.weight.detach(), p + "mlp.fc2.bias": blk.mlp.fc2.bias.detach(),
            p + "layer_scale1.lambda1": _gain(blk.ls1, d), p + "layer_scale2.lambda1": _gain(blk.ls2, d),
        })
    return config, s, name


# ------------------------------------------------------------------------------------ DINOv3
def _dinov3(backbone: Backbone) -> tuple[Any, dict[str, Tensor], str]:
    """(transformers config, state dict, class name) for a timm Eva with DINOv3's rotary embedding."""
    t = require("transformers", "hf", "--format hf")
    m = backbone.model
    d = int(m.embed_dim)
    rope = getattr(m, "rope", None)
    if type(rope).__name__ != "RotaryEmbeddingDinoV3":
        raise _refuse(f"an Eva ViT with {type(rope).__name__} position embeddings (DINOv3's rotary "
                      "embedding is supported)")
    if getattr(m, "pos_embed", None) is not None or getattr(m, "rope_mixed", False):
        raise _refuse("an Eva ViT with an absolute position embedding or mixed rotary embeddings")
    if rope.min_period is not None or rope.max_period is not None or rope.temperature is None:
        raise _refuse("a rotary embedding given by periods (DINOv3's is given by its base)")
    if rope.normalize_coords != "separate" or rope.grid_offset or rope.grid_indexing != "ij":
        raise _refuse("a rotary embedding with other patch coordinates than DINOv3's")
    if getattr(m, "cls_token", None) is None or not _is_identity(getattr(m, "norm_pre", None)):
        raise _refuse("an Eva ViT without a class token or with a pre-norm")
    blocks = list(m.blocks)
    blk0 = blocks[0]
    gated = hasattr(blk0.mlp, "fc1_g")
    for blk in blocks:
        a = blk.attn
        if not hasattr(a, "qkv") or a.qkv is None:
            raise _refuse("an Eva ViT with split q/k/v projections")
        if not (_is_identity(a.q_norm) and _is_identity(a.k_norm) and _is_identity(getattr(a, "norm", None))):
            raise _refuse("an Eva ViT with q/k norms or a norm inside attention")
        if not _is_identity(getattr(blk.mlp, "norm", None)) or hasattr(blk, "attn_drop_path"):
            raise _refuse("an Eva ViT with a norm inside the MLP")
    if gated:
        hidden = int(blk0.mlp.fc1_g.out_features)
        act = _act_name(blk0.mlp.act, {nn.SiLU: "silu", nn.GELU: "gelu"})
    else:
        hidden = int(blk0.mlp.fc1.out_features)
        act = _act_name(blk0.mlp.act, {nn.GELU: "gelu"})
    bias = _qkv_bias(blk0.attn)
    patch = _square(m.patch_embed.patch_size)
    grid = m.patch_embed.grid_size
    config = t.DINOv3ViTConfig(
        patch_size=patch, hidden_size=d, intermediate_size=hidden, num_hidden_layers=len(blocks),
        num_attention_heads=int(blk0.attn.num_heads), hidden_act=act, layer_norm_eps=float(m.norm.eps),
        rope_theta=float(rope.temperature), image_size=_square(grid) * patch,
        num_channels=int(m.patch_embed.proj.in_channels), query_bias=bias is not None,
        key_bias=bias is not None, value_bias=bias is not None, proj_bias=blk0.attn.proj.bias is not None,
        mlp_bias=(blk0.mlp.fc1_g if gated else blk0.mlp.fc1).bias is not None, layerscale_value=1.0,
        use_gated_mlp=gated, num_register_tokens=backbone.num_registers,
        pos_embed_shift=rope.shift_coords, pos_embed_jitter=rope.jitter_coords,
        pos_embed_rescale=rope.rescale_coords)
    s: dict[str, Tensor] = {
        "embeddings.cls_token": m.cls_token.detach(),
        "embeddings.patch_embeddings.weight": m.patch_embed.proj.weight.detach(),
        "embeddings.patch_embeddings.bias": m.patch_embed.proj.bias.detach(),
        "norm.weight": m.norm.weight.detach(), "norm.bias": m.norm.bias.detach(),
    }
    mask = getattr(backbone, "mask_token", None)
    s["embeddings.mask_token"] = mask.detach().reshape(1, 1, d) if mask is not None else torch.zeros(1, 1, d)
    reg = getattr(m, "reg_token", None)
    s["embeddings.register_tokens"] = reg.detach() if reg is not None else torch.zeros(1, 0, d)
    for i, blk in enumerate(blocks):
        p = f"model.layer.{i}."
        q, k, v = _split_qkv(blk.attn.qkv.weight)
        s.update({p + "attention.q_proj.weight": q, p + "attention.k_proj.weight": k,
                  p + "attention.v_proj.weight": v,
                  p + "attention.o_proj.weight": blk.attn.proj.weight.detach(),
                  p + "norm1.weight": blk.norm1.weight.detach(), p + "norm1.bias": blk.norm1.bias.detach(),
                  p + "norm2.weight": blk.norm2.weight.detach(), p + "norm2.bias": blk.norm2.bias.detach(),
                  p + "layer_scale1.lambda1": _gain(blk.gamma_1, d),
                  p + "layer_scale2.lambda1": _gain(blk.gamma_2, d)})
        b = _qkv_bias(blk.attn)
        if b is not None:
            qb, kb, vb = _split_qkv(b)
            s.update({p + "attention.q_proj.bias": qb, p + "attention.k_proj.bias": kb,
                      p + "attention.v_proj.bias": vb})
        if blk.attn.proj.bias is not None:
            s[p + "attention.o_proj.bias"] = blk.attn.proj.bias.detach()
        mlp = blk.mlp
        pairs = ([("fc1_g", "gate_proj"), ("fc1_x", "up_proj"), ("fc2", "down_proj")] if gated
                 else [("fc1", "up_proj"), ("fc2", "down_proj")])
        for src, dst in pairs:
            layer = getattr(mlp, src)
            s[p + f"mlp.{dst}.weight"] = layer.weight.detach()
            if layer.bias is not None:
                s[p + f"mlp.{dst}.bias"] = layer.bias.detach()
    return config, s, "DINOv3ViTModel"


def _qkv_bias(attn: nn.Module) -> Tensor | None:
    """The fused q/k/v bias of a timm Eva attention (its q, k, v biases concatenated), or None."""
    if getattr(attn.qkv, "bias", None) is not None:
        return attn.qkv.bias.detach()
    q = getattr(attn, "q_bias", None)
    if q is None:
        return None
    k = getattr(attn, "k_bias", None)
    k = k if k is not None else torch.zeros_like(q)
    return torch.cat([q.detach(), k.detach(), attn.v_bias.detach()])


# ---------------------------------------------------------------------------------- the folder
def hf_model_parts(backbone: Backbone, input_size: int) -> tuple[Any, dict[str, Tensor], str]:
    """The ``transformers`` config, state dict (transformers' key names) and model class name
    for ``backbone``; raises :class:`UnsupportedForHFError` for architectures without one."""
    from dinokit.backbones.eva import is_timm_eva
    from dinokit.backbones.vit import is_timm_vit

    model = getattr(backbone, "model", None)
    if model is not None and is_timm_eva(model):
        return _dinov3(backbone)
    if model is not None and is_timm_vit(model):
        return _dinov2(backbone, input_size)
    raise _refuse(f"a {type(model or backbone).__name__} backbone")


#: DINOv2 attention key names of transformers before version 5 (``attention.attention.query``,
#: ``attention.output.dense``), for the installed version's own class.
_DINOV2_V4_NAMES = {"attention.q_proj.": "attention.attention.query.",
                    "attention.k_proj.": "attention.attention.key.",
                    "attention.v_proj.": "attention.attention.value.",
                    "attention.o_proj.": "attention.output.dense."}


def _installed_key_names(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """``state`` under the key names of the installed transformers' class (4.x DINOv2 names its
    attention projections otherwise)."""
    out = {}
    for k, v in state.items():
        if k not in expected and k.startswith("encoder."):
            for new, old in _DINOV2_V4_NAMES.items():
                k = k.replace(new, old)
        out[k] = v
    return out


def image_processor_config(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """``BitImageProcessor`` settings that repeat dinokit's evaluation view: resize the short side to
    ``round(input_size / crop_fraction)`` (bicubic), centre crop ``input_size``, scale to [0, 1],
    normalise with the run's mean and std."""
    from dinokit.data.preprocessing import Preprocessing

    p = Preprocessing.from_dict(dict(preprocessing))
    resample = {"nearest": 0, "nearest-exact": 0, "bilinear": 2, "bicubic": 3}[p.interpolation]
    return {"image_processor_type": "BitImageProcessor", "do_resize": True,
            "size": {"shortest_edge": p.resize_size}, "resample": resample, "do_center_crop": True,
            "crop_size": {"height": p.input_size, "width": p.input_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p.mean),
            "image_std": list(p.std), "do_convert_rgb": p.channels == 3}


def export_hf_folder(source: Any, folder: str | Path, *, which: str = "teacher",
                     preprocessing: dict[str, Any] | None = None) -> Path:
    """Write a ``transformers`` folder (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``, ``dinokit.json``) for ``source`` (a method, a Backbone, a training
    checkpoint or a run directory; as :func:`~dinokit.export.export_backbone`). The folder is written
    under a temporary sibling name and renamed into place."""
    from dinokit.export import _metadata, _resolve

    t = require("transformers", "hf", "--format hf")
    e = _resolve(source, which, timm_name=None, timm_kwargs=None, preprocessing=preprocessing)
    config, state, name = hf_model_parts(e.backbone, int(e.preprocessing.get("input_size") or 224))
    model = getattr(t, name)(config).eval()
    state = _installed_key_names(state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:  # a mapping bug, never the user's input
        raise RuntimeError(f"{name} keys not matched: missing {missing}, unexpected {unexpected}")
    processor = image_processor_config(e.preprocessing)
    meta = {**_metadata(e, which), "transformers_class": name}
    with staged_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
    return Path(folder)
