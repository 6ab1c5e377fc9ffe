"""The one feature interface every dinokit backbone speaks.

Methods, evaluation and pictures never touch a timm or torchvision model directly: they see a
:class:`Backbone`, whose ``forward`` returns a :class:`BackboneOutput` with the pooled/CLS
embedding ``[B, D]``, the patch tokens ``[B, N, D]`` (or ``None``) and the register tokens
``[B, R, D]`` (or ``None``) kept apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class BackboneOutput:
    """Features of one batch of images.

    Attributes:
        cls: pooled or CLS embedding, ``[B, D]``.
        patches: patch tokens (ViT) or flattened feature-map cells (CNN), ``[B, N, D]``, or None.
        registers: register tokens, ``[B, R, D]``, or None when the model has none.
    """

    cls: Tensor
    patches: Tensor | None = None
    registers: Tensor | None = None


class Backbone(nn.Module):
    """Base class: wraps a network and exposes DINO's feature interface.

    Subclasses set ``embed_dim``, ``in_chans`` and the capability flags, and implement
    :meth:`forward`. Capabilities a model lacks raise a ``TypeError`` that says so.
    """

    embed_dim: int
    in_chans: int | None = None
    num_registers: int = 0
    patch_size: int | None = None
    has_cls_token: bool = False
    supports_masking: bool = False
    supports_attention: bool = False
    #: timm architecture name when the wrapped model is a timm model (used by export).
    timm_name: str | None = None
    #: keyword arguments the timm model was built with (``in_chans``, ``img_size``, ...), for export.
    timm_kwargs: dict | None = None
    #: mean/std/input_size/channels the weights expect (set by ``load_backbone`` on an export).
    preprocessing: dict | None = None
    #: whether the blocks recompute activations in backward (see :meth:`set_grad_checkpointing`).
    grad_checkpointing: bool = False
    #: multi-crop in one sequence-packed pass: True, False or "auto" (wherever the backbone can);
    #: read by :func:`~dinokit.methods.base.forward_views` for backbones with ``forward_packed``.
    packed_crops: bool | str = "auto"

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations during backward to save memory (ViTs; CNNs through timm)."""
        model = getattr(self, "model", None)
        if model is not None and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(enable)
        elif enable:
            raise TypeError(f"{type(self).__name__} does not support activation checkpointing")
        self.grad_checkpointing = bool(enable)

    def forward(self, x: Tensor, masks: Tensor | None = None) -> BackboneOutput:  # pragma: no cover
        raise NotImplementedError

    @property
    def has_patch_tokens(self) -> bool:
        """Whether :meth:`forward` returns patch tokens."""
        return self.patch_size is not None or getattr(self, "_has_feature_map", False)

    def check_input(self, x: Tensor, name: str = "images") -> None:
        """Raise a clear error when ``x`` is not a ``[B, C, H, W]`` batch this model can read."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            raise ValueError(
                f"{name} has {x.shape[1]} channels (shape {tuple(x.shape)}) but the backbone "
                f"expects {self.in_chans}"
            )

    def enable_mask_token(self) -> None:
        """Create the learned mask token used by masked-image objectives (iBOT)."""
        raise TypeError(
            f"{type(self).__name__} cannot mask patches: masked-patch losses (iBOT) need a ViT "
            "backbone with patch tokens"
        )

    def last_self_attention(self, x: Tensor) -> Tensor:
        """Softmax attention of the last block, ``[B, heads, T, T]`` (T = prefix + patches)."""
        raise TypeError(
            f"{type(self).__name__} has no self-attention: attention maps need a ViT backbone; "
            "use PCA maps of patch features instead (dinokit viz pca)"
        )

    def intermediate_cls(self, x: Tensor, n: int) -> Tensor:
        """Concatenated CLS tokens of the last ``n`` blocks, ``[B, n * D]`` (DINO linear eval)."""
        if n != 1:
            raise TypeError(f"{type(self).__name__} has no intermediate CLS tokens (n={n})")
        return self(x).cls

    def intermediate_patches(self, x: Tensor, n: int) -> Tensor:
        """Patch tokens of the last ``n`` blocks concatenated on the feature axis, ``[B, N, n * D]``
        (DINOv2/v3's "last 4 layers" input of dense linear probes)."""
        if n != 1:
            raise TypeError(f"{type(self).__name__} has no intermediate patch tokens (n={n})")
        return self(x).patches

    @torch.no_grad()
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of an ``height x width`` input."""
        if self.patch_size is None:
            raise TypeError(f"{type(self).__name__} has no patch grid")
        return height // self.patch_size, width // self.patch_size


def cls_embedding(backbone: nn.Module, x: Tensor) -> Tensor:
    """``backbone(x).cls``, asking for the CLS token only where the backbone can skip work for it
    (``supports_cls_only``: a ViT runs its last block for the CLS rows only, which is exact)."""
    if getattr(backbone, "supports_cls_only", False):
        return backbone(x, cls_only=True).cls
    return backbone(x).cls


def suggest_sizes(size: int, patch: int) -> list[int]:
    """The multiples of ``patch`` nearest to ``size`` (one below, one above)."""
    below = max(patch, size // patch * patch)
    return sorted({below, below + patch})


def check_crop_sizes(patch_size: int | None, sizes: dict[str, int]) -> None:
    """Raise when a crop size (``{"global_size": 224, ...}``) is not a multiple of the patch size.

    The message names the crop and suggests the nearest sizes that work.
    """
    if not patch_size:
        return
    for name, size in sizes.items():
        if size and size % patch_size:
            raise ValueError(
                f"{name}={size} is not a multiple of the patch size {patch_size}: the ViT would drop "
                f"the border pixels; use {' or '.join(map(str, suggest_sizes(size, patch_size)))}"
            )
