"""Weight initialisation schemes for a freshly built timm ViT (``backbone.init``).

- ``"timm"``: the weights as timm creates them, which is the official DINOv2 ViT's
  ``init_weights``: linear weights trunc-normal(0.02) with zero biases, the position embedding
  trunc-normal(0.02), the class and register tokens N(0, 1e-6), LayerNorm 1 / 0, and PyTorch's
  default (kaiming-uniform) for the patch-embedding convolution. Nothing is changed.
- ``"xavier"``: the scheme of MAE (He et al. 2022, ``initialize_weights``) that lightly's
  ``MaskedVisionTransformerTIMM`` applies to a timm ViT: every linear weight xavier-uniform
  (bound ``sqrt(6 / (fan_in + fan_out))``) with zero biases, the patch-embedding kernel
  xavier-uniform as the linear map it is (``[D, C * p * p]``; its bias kept), the class token
  N(0, 0.02), LayerNorm 1 / 0. The position embedding, the register tokens and dinokit's mask
  token keep their own initialisation.

Xavier-uniform scales each weight to its layer's widths (std ``sqrt(2 / (fan_in + fan_out))``),
where the 0.02 of ``"timm"`` is one figure for every width: near xavier's at ViT-B's width 768
(0.036 for a square layer), six times below it at the tiny CPU ViT's width 64 (0.125). The official behaviour
stays the default; the tiny CPU presets' choice and the trials behind it are in BENCHMARKS.md.
"""

from __future__ import annotations

import torch
from torch import nn

from dinokit.backbones.base import Backbone
from dinokit.backbones.vit import ViTBackbone, is_timm_vit

#: The values of ``backbone.init``.
VIT_INITS: tuple[str, ...] = ("timm", "xavier")


def xavier_init_vit_(model: nn.Module) -> None:
    """Re-initialise the timm ``VisionTransformer`` ``model`` in place with the ``"xavier"`` scheme
    (module docstring)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = model.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        cls = getattr(model, "cls_token", None)
        if cls is not None:
            nn.init.normal_(cls, std=0.02)


def check_init(scheme: str, *, pretrained: bool = False) -> None:
    """Refuse (``ValueError`` naming ``backbone.init``) a scheme that is unknown, or that would
    overwrite the published weights of ``pretrained``; called before the backbone is built."""
    if scheme not in VIT_INITS:
        raise ValueError(f"backbone.init: {scheme!r} is not one of {list(VIT_INITS)}")
    if scheme != "timm" and pretrained:
        raise ValueError(f"backbone.init: {scheme!r} would overwrite the published weights that "
                         "backbone.pretrained=true loads; use backbone.init=timm")


def apply_init(backbone: Backbone, scheme: str) -> None:
    """Initialise ``backbone``'s weights with ``scheme`` (one of :data:`VIT_INITS`).

    ``"timm"`` leaves them as built. ``"xavier"`` needs a timm ``VisionTransformer``
    (:class:`~dinokit.backbones.vit.ViTBackbone`; not timm's Eva family, rotary embeddings and an
    initialisation of its own); any other backbone is refused with a ``ValueError`` naming
    ``backbone.init``.
    """
    check_init(scheme)
    if scheme == "timm":
        return
    if not (isinstance(backbone, ViTBackbone) and is_timm_vit(backbone.model)):
        name = getattr(backbone, "timm_name", None) or type(getattr(backbone, "model", backbone)).__name__
        raise ValueError(f"backbone.init: {scheme!r} applies to timm ViTs (vit_*, deit*) only, not "
                         f"{name} ({type(backbone).__name__}); use backbone.init=timm")
    xavier_init_vit_(backbone.model)
