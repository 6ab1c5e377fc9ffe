"""timm's ``Eva`` ViTs (DINOv3, EVA-02) behind the dinokit feature interface.

DINOv3 (Siméoni et al. 2025) ViTs have no absolute position embedding: every block applies
rotary position embeddings (RoPE) to the patch queries and keys, and the sequence is
``[CLS, 4 storage tokens, patches]``. As in the official ``prepare_tokens_with_masks``, the iBOT
mask token replaces masked patch embeddings right after the patch projection, before the
CLS/storage tokens are prepended; timm's ``Eva._pos_embed`` then adds the (absent or absolute)
position embedding and returns the rotary embedding that each block takes.
"""

from __future__ import annotations

import torch
from timm.models.eva import Eva
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinokit.backbones.base import BackboneOutput
from dinokit.backbones.vit import ViTBackbone


def is_timm_eva(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``Eva`` (DINOv3 ``*_dinov3*``, ``eva02_*``, ``vit_*_rope_*``)."""
    return isinstance(model, Eva)


class EvaBackbone(ViTBackbone):
    """A timm ``Eva`` ViT; token order ``[CLS, registers..., patches...]``.

    Args:
        model: a timm ``Eva`` (built with ``dynamic_img_size=True`` for multi-crop; timm's DINOv3
            models are).
        timm_name: the timm architecture name, recorded for export.
    """

    accepts = staticmethod(is_timm_eva)

    def __init__(self, model: nn.Module, timm_name: str | None = None):
        super().__init__(model, extra_registers=0, timm_name=timm_name)

    def tokens_and_rope(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Token sequence entering the blocks ``[B, T, D]`` and the rotary embedding (or None)."""
        self.check_input(x)
        self._check_size(x)
        m = self.model
        t = self._mask(m.patch_embed(x), masks)
        t, rope = m._pos_embed(t)
        return m.norm_pre(t), rope

    def tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        return self.tokens_and_rope(x, masks)[0]

    def _blocks(self, t: Tensor, rope: Tensor | None, upto: int | None = None) -> list[Tensor]:
        """Run the blocks (all, or the first ``upto``); returns every block's output."""
        m = self.model
        mixed = bool(getattr(m, "rope_mixed", False)) and rope is not None
        ckpt = bool(getattr(m, "grad_checkpointing", False)) and torch.is_grad_enabled()
        outs = []
        for i, blk in enumerate(list(m.blocks)[:upto]):
            r = rope[i] if mixed else rope
            t = checkpoint(blk, t, rope=r, use_reentrant=False) if ckpt else blk(t, rope=r)
            outs.append(t)
        return outs

    def forward(self, x: Tensor, masks: Tensor | None = None) -> BackboneOutput:
        t, rope = self.tokens_and_rope(x, masks)
        t = self._blocks(t, rope)[-1]
        return self._split(self.model.norm(t))

    def last_self_attention(self, x: Tensor) -> Tensor:
        """Softmax attention of the last block, ``[B, heads, T, T]`` (RoPE applied, as in the model).

        The last block runs once on timm's explicit (non-fused) attention path; its softmax is
        read where it enters the attention dropout.
        """
        t, rope = self.tokens_and_rope(x)
        n = len(self.model.blocks)
        if n > 1:
            t = self._blocks(t, rope, upto=n - 1)[-1]
        last = self.model.blocks[-1]
        attn = last.attn
        seen: list[Tensor] = []
        handle = attn.attn_drop.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
        fused = getattr(attn, "fused_attn", False)
        attn.fused_attn = False
        try:
            mixed = bool(getattr(self.model, "rope_mixed", False)) and rope is not None
            last(t, rope=rope[n - 1] if mixed else rope)
        finally:
            attn.fused_attn = fused
            handle.remove()
        if not seen:
            raise TypeError(f"cannot read the attention of {type(attn).__name__}")
        return seen[0]

    def intermediate_cls(self, x: Tensor, n: int) -> Tensor:
        """Normalised CLS tokens of the last ``n`` blocks, concatenated: ``[B, n * D]``."""
        depth = len(self.model.blocks)
        if not 1 <= n <= depth:
            raise ValueError(f"n must be in [1, {depth}] for this ViT, got {n}")
        t, rope = self.tokens_and_rope(x)
        outs = self._blocks(t, rope)[depth - n :]
        return torch.cat([self._split(self.model.norm(o)).cls for o in outs], dim=-1)

    def intermediate_patches(self, x: Tensor, n: int) -> Tensor:
        """Normalised patch tokens of the last ``n`` blocks, concatenated: ``[B, N, n * D]``."""
        depth = len(self.model.blocks)
        if not 1 <= n <= depth:
            raise ValueError(f"n must be in [1, {depth}] for this ViT, got {n}")
        t, rope = self.tokens_and_rope(x)
        outs = self._blocks(t, rope)[depth - n :]
        return torch.cat([self._split(self.model.norm(o)).patches for o in outs], dim=-1)
