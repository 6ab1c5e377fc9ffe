"""timm Vision Transformers behind the dinokit feature interface.

Adds what DINO-family methods need on top of timm's ``VisionTransformer``: a learned mask token
applied before the position embedding (iBOT), register tokens kept apart from the patches
(Darcet et al., ICLR 2024), the last block's self-attention (DINO's attention maps) and the CLS
tokens of the last ``n`` blocks (DINO's linear evaluation input).

``cls_only=True`` (:meth:`ViTBackbone.forward`, :meth:`~ViTBackbone.forward_packed`) is for callers
that read ``out.cls`` only (DINO's loss): the last block then runs for the CLS rows only
(:func:`~dinokit.backbones.packed.cls_only_block`), which is exact, and ``patches`` and
``registers`` come back None. Where it cannot (no class token, a non-plain last block, hooks that
must see every token), the call runs the full forward and returns the full output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinokit.backbones.base import Backbone, BackboneOutput, suggest_sizes
from dinokit.backbones.packed import PackedLayout, cls_only_block, has_hooks, packable_block, packed_block
from dinokit.backbones.stochastic_depth import DROP_PATH_MODES, subset_block


def is_timm_vit(model: nn.Module) -> bool:
    """Whether ``model`` looks like a timm ``VisionTransformer`` (patch_embed, blocks, norm).

    timm's ``Eva`` family (DINOv3, EVA-02: rotary position embeddings) is not one: its
    ``_pos_embed`` also returns the rotary embedding; :class:`~dinokit.backbones.eva.EvaBackbone`
    drives it.
    """
    if hasattr(model, "rope") or type(model).__name__ == "Eva":
        return False
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "norm", "_pos_embed")) and (
        hasattr(model, "num_prefix_tokens")
    )


def native_registers(model: nn.Module) -> int:
    """Register (storage) tokens a timm ViT or Eva model carries itself."""
    n = getattr(model, "num_reg_tokens", None)
    if n is None:
        reg = getattr(model, "reg_token", None)
        n = int(reg.shape[1]) if reg is not None else 0
    return int(n or 0)


class ViTBackbone(Backbone):
    """A timm ViT; token order is ``[CLS, registers..., patches...]``.

    Args:
        model: a timm ``VisionTransformer`` (built with ``dynamic_img_size=True`` so that 224- and
            96-pixel crops share one model).
        extra_registers: register tokens to add on top of the ones the model already has (for a
            ViT built elsewhere without ``reg_tokens``); they carry no position embedding.
        timm_name: the timm architecture name, recorded for export.
    """

    supports_attention = True
    #: the model family this class drives (a predicate over the module).
    accepts = staticmethod(is_timm_vit)
    #: stochastic depth of plain timm blocks in training: ``"sample"`` (timm's ``DropPath``: every
    #: sample through the branch, times a 0/1 mask) or ``"subset"`` (DINOv2/v3: the branch on a
    #: kept subset only, see :mod:`~dinokit.backbones.stochastic_depth`).
    drop_path_mode: str = "sample"
    #: with ``"subset"``: only branches whose rate is above this take it (DINOv3 0; DINOv2 0.1).
    drop_path_subset_above: float = 0.0

    def __init__(self, model: nn.Module, extra_registers: int = 0, timm_name: str | None = None):
        super().__init__()
        if not self.accepts(model):
            raise TypeError(f"{type(self).__name__} cannot drive a {type(model).__name__}")
        if extra_registers < 0:
            raise ValueError(f"extra_registers must be >= 0, got {extra_registers}")
        self.model = model
        self.timm_name = timm_name
        self.embed_dim = int(model.embed_dim)
        self.in_chans = int(model.patch_embed.proj.in_channels)
        ps = model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.has_cls_token = getattr(model, "cls_token", None) is not None
        self.native_registers = native_registers(model)
        self.extra_registers = int(extra_registers)
        self.num_registers = self.native_registers + self.extra_registers
        self.supports_masking = True
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, extra_registers, self.embed_dim)) if extra_registers else None
        )
        if self.register_tokens is not None:
            nn.init.trunc_normal_(self.register_tokens, std=0.02)
        self.mask_token: nn.Parameter | None = None
        self.dynamic_img_size = bool(getattr(model, "dynamic_img_size", False))

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register tokens in front of the patches."""
        return int(self.model.num_prefix_tokens) + self.extra_registers

    def enable_mask_token(self) -> None:
        """Create the learned mask token (idempotent); masked patches are replaced by it."""
        if self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _check_size(self, x: Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            bad = h if h % self.patch_size else w
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}; use "
                f"{' or '.join(map(str, suggest_sizes(bad, self.patch_size)))}"
            )
        if not self.dynamic_img_size:
            expected = tuple(self.model.patch_embed.img_size)
            if (h, w) != expected:
                raise ValueError(
                    f"image size {h}x{w} differs from the ViT's fixed size {expected[0]}x"
                    f"{expected[1]}; build it with dynamic_img_size=True for multi-crop"
                )

    def tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Token sequence entering the blocks, ``[B, T, D]``.

        ``masks`` (``[B, N]`` bool, True = masked) replaces those patches by the mask token before
        the position embedding, as in iBOT/DINOv2.
        """
        self.check_input(x)
        self._check_size(x)
        m = self.model
        t = self._mask(m.patch_embed(x), masks)  # [B, H, W, D] (dynamic size) or [B, N, D]
        t = m._pos_embed(t)
        if self.register_tokens is not None:
            n0 = int(m.num_prefix_tokens)
            regs = self.register_tokens.expand(t.shape[0], -1, -1).to(t.dtype)
            t = torch.cat([t[:, :n0], regs, t[:, n0:]], dim=1)
        t = m.patch_drop(t)
        return m.norm_pre(t)

    def _mask(self, t: Tensor, masks: Tensor | None) -> Tensor:
        """Replace the masked patch embeddings (``masks [B, N]`` bool) by the mask token."""
        if masks is None:
            return t
        if self.mask_token is None:
            raise RuntimeError("masks given but the mask token is off; call enable_mask_token()")
        flat = t.reshape(t.shape[0], -1, t.shape[-1])
        if masks.shape != flat.shape[:2]:
            raise ValueError(
                f"masks has shape {tuple(masks.shape)} but the images give "
                f"{tuple(flat.shape[:2])} (batch, patches)"
            )
        flat = torch.where(masks.unsqueeze(-1), self.mask_token.to(flat.dtype), flat)
        return flat.reshape(t.shape)

    def _split(self, t: Tensor) -> BackboneOutput:
        p = self.num_prefix_tokens
        start = 1 if self.has_cls_token else 0
        regs = t[:, start:p] if self.num_registers else None
        patches = t[:, p:]
        if self.has_cls_token:
            cls = t[:, 0]
        else:
            cls = patches.mean(dim=1)
        return BackboneOutput(cls=cls, patches=patches, registers=regs)

    def _checkpointing(self) -> bool:
        return bool(getattr(self.model, "grad_checkpointing", False)) and torch.is_grad_enabled()

    def _subset_above(self) -> float | None:
        """The rate above which a branch takes the subset form now; None = timm's ``DropPath``."""
        if self.drop_path_mode not in DROP_PATH_MODES:
            raise ValueError(f"drop_path_mode must be one of {DROP_PATH_MODES}, got {self.drop_path_mode!r}")
        if not self.training or self.drop_path_mode != "subset":
            return None
        return float(self.drop_path_subset_above)

    @property
    def supports_cls_only(self) -> bool:
        """Whether :meth:`forward` and :meth:`forward_packed` take ``cls_only`` (a subclass that
        overrides ``forward`` without it does not)."""
        return type(self).forward is ViTBackbone.forward

    def _cls_only_block(self) -> nn.Module | None:
        """The last block, when a ``cls_only`` call may run it for the CLS rows only: with a class
        token (the CLS output is token 0), a plain timm block
        (:func:`~dinokit.backbones.packed.packable_block`) and no hooks on this backbone, the
        blocks, the last block or the final norm (hooks see the full forward, as always)."""
        blocks = self.model.blocks
        if not (self.has_cls_token and len(blocks)):
            return None
        last, norm = blocks[-1], self.model.norm
        if has_hooks(self) or has_hooks(blocks) or any(has_hooks(m) for m in norm.modules()):
            return None
        if any(m._backward_hooks or m._backward_pre_hooks for m in last.modules()):
            return None
        return last if packable_block(last) else None

    def _run_block(self, blk: nn.Module, t: Tensor, ckpt: bool, above: float | None) -> Tensor:
        if above is not None and packable_block(blk):  # branches on the kept samples only
            fn, args = subset_block, (blk, t, above)
        else:
            fn, args = blk, (t,)
        return checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args)

    def forward(self, x: Tensor, masks: Tensor | None = None, *, cls_only: bool = False) -> BackboneOutput:
        """Features of ``x [B, C, H, W]`` (``masks [B, N]``: iBOT mask tokens).

        ``cls_only``: the caller reads ``out.cls`` only; where it can (:meth:`_cls_only_block`) the
        last block then runs for the CLS rows only (exact) and ``patches``/``registers`` are None;
        otherwise the full forward and output.
        """
        t = self.tokens(x, masks)
        ckpt, above = self._checkpointing(), self._subset_above()
        last = self._cls_only_block() if cls_only else None
        if last is None and above is None and not ckpt:
            t = self.model.blocks(t)
        else:
            body = list(self.model.blocks)
            for blk in body if last is None else body[:-1]:
                t = self._run_block(blk, t, ckpt, above)
        if last is None:
            return self._split(self.model.norm(t))
        args = (last, t.reshape(-1, t.shape[-1]), PackedLayout([tuple(t.shape[:2])]), above)
        c = checkpoint(cls_only_block, *args, use_reentrant=False) if ckpt else cls_only_block(*args)
        return BackboneOutput(cls=self.model.norm(c))

    @property
    def can_pack(self) -> bool:
        """Whether :meth:`forward_packed` really packs (every block a plain timm pre-norm block)."""
        return all(packable_block(b) for b in self.model.blocks)

    def forward_packed(
        self, inputs: Sequence[tuple[Tensor, Tensor | None]], *, cls_only: bool = False
    ) -> list[BackboneOutput]:
        """Several batches of crops (one per resolution, each ``(images, masks or None)``) through
        the blocks in one sequence-packed pass, attention kept within each crop; one output per
        batch, equal to ``self(images, masks)`` up to float rounding. Each crop gets its own
        position-embedding interpolation, registers and mask tokens (:meth:`tokens`).
        ``cls_only`` as in :meth:`forward`."""
        if len(inputs) == 1 or not self.can_pack:
            kw = {"cls_only": True} if cls_only and self.supports_cls_only else {}
            return [self(x, masks=m, **kw) for x, m in inputs]
        toks = [self.tokens(x, m) for x, m in inputs]
        layout = PackedLayout([(t.shape[0], t.shape[1]) for t in toks])
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in toks])
        ckpt, above = self._checkpointing(), self._subset_above()
        last = self._cls_only_block() if cls_only else None
        blocks = list(self.model.blocks)
        for blk in blocks if last is None else blocks[:-1]:
            args = (blk, x, layout, above)
            x = checkpoint(packed_block, *args, use_reentrant=False) if ckpt else packed_block(*args)
        if last is None:
            return [self._split(t) for t in layout.split(self.model.norm(x))]
        args = (last, x, layout, above)
        c = checkpoint(cls_only_block, *args, use_reentrant=False) if ckpt else cls_only_block(*args)
        return [BackboneOutput(cls=o) for o in self.model.norm(c).split([n for n, _ in layout.shapes])]

    def last_self_attention(self, x: Tensor) -> Tensor:
        """Softmax attention of the last block, ``[B, heads, T, T]``, computed explicitly."""
        t = self.tokens(x)
        blocks = list(self.model.blocks)
        for blk in blocks[:-1]:
            t = blk(t)
        last = blocks[-1]
        attn_mod = last.attn
        h = last.norm1(t)
        B, T, _ = h.shape
        heads = attn_mod.num_heads
        head_dim = attn_mod.qkv.out_features // (3 * heads)
        qkv = attn_mod.qkv(h).reshape(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn_mod.q_norm(qkv[0]), attn_mod.k_norm(qkv[1])
        scores = (q * attn_mod.scale) @ k.transpose(-2, -1)
        return scores.softmax(dim=-1)

    def _last_blocks(self, x: Tensor, n: int) -> list[BackboneOutput]:
        """The normalised tokens of the last ``n`` blocks, split into CLS and patches."""
        blocks = list(self.model.blocks)
        if not 1 <= n <= len(blocks):
            raise ValueError(f"n must be in [1, {len(blocks)}] for this ViT, got {n}")
        t = self.tokens(x)
        outs = []
        for i, blk in enumerate(blocks):
            t = blk(t)
            if i >= len(blocks) - n:
                outs.append(self._split(self.model.norm(t)))
        return outs

    def intermediate_cls(self, x: Tensor, n: int) -> Tensor:
        """Normalised CLS tokens of the last ``n`` blocks, concatenated: ``[B, n * D]``."""
        return torch.cat([o.cls for o in self._last_blocks(x, n)], dim=-1)

    def intermediate_patches(self, x: Tensor, n: int) -> Tensor:
        """Normalised patch tokens of the last ``n`` blocks, concatenated: ``[B, N, n * D]``."""
        return torch.cat([o.patches for o in self._last_blocks(x, n)], dim=-1)
