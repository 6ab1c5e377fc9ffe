"""Sequence-packed multi-crop: crops of several resolutions through the ViT blocks in one pass.

DINO's multi-crop runs the student once per resolution (``MultiCropWrapper``: two 224 crops, then
the 96 crops). Packing flattens the tokens of every crop of the step into one ``[rows, D]`` stream:
the per-token layers of a pre-norm block (LayerNorms, the qkv and output projections, the MLP,
layer scale) run once over all of it, and only scaled dot-product attention is split, one call per
resolution run, so that each crop attends to its own tokens only (no padding, no masked-out
score matrix). The result equals the per-resolution forward up to float rounding.

:func:`cls_only_block` runs a last block whose patch and register outputs nobody reads (DINO uses
the CLS token only): every token still goes through ``norm1`` and the key/value projection (the
CLS query attends to them), but only the CLS row of each crop gets its query, the attention, the
output projection, the residuals, ``norm2`` and the MLP: about 10 of the block's 12 ``D^2``
multiply-adds per token are skipped for every non-CLS token, forward and backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from dinokit.backbones.stochastic_depth import (
    drop_rate,
    packed_subset_cls_residual,
    packed_subset_residual,
    uses_subset,
)


def packable_block(block: nn.Module) -> bool:
    """Whether ``block`` is a plain timm pre-norm ``Block`` with a plain ``Attention`` (what
    :func:`packed_block` reproduces); other block types run unpacked."""
    attn = getattr(block, "attn", None)
    # exact types: FSDP-wrapped or otherwise subclassed blocks run unpacked, and so do blocks
    # whose hooks the packed path would bypass
    return (type(block) is Block and type(attn) is Attention and getattr(attn, "gate", None) is None
            and not getattr(attn, "is_causal", False) and not any(has_hooks(m) for m in block.modules()))


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or forward-pre hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class PackedLayout:
    """Where each resolution run sits in the packed stream.

    Args:
        shapes: ``(crops, tokens_per_crop)`` of each run, in stream order.
    """

    def __init__(self, shapes: Sequence[tuple[int, int]]):
        self.shapes = [(int(n), int(t)) for n, t in shapes]
        self.rows: list[tuple[int, int]] = []
        r = 0
        for n, t in self.shapes:
            self.rows.append((r, r + n * t))
            r += n * t
        self.n_rows = r
        self.n_crops = sum(n for n, _ in self.shapes)
        self._crop_index: Tensor | None = None

    def crop_index(self, device: torch.device) -> Tensor:
        """Crop number of every row of the stream, ``[rows]`` (for per-crop stochastic depth)."""
        if self._crop_index is None or self._crop_index.device != device:
            counts = torch.tensor([t for n, t in self.shapes for _ in range(n)], device=device)
            self._crop_index = torch.repeat_interleave(torch.arange(self.n_crops, device=device), counts)
        return self._crop_index

    def split(self, x: Tensor) -> list[Tensor]:
        """The stream ``[rows, D]`` back to one ``[crops, tokens, D]`` tensor per run (one
        ``split``: its backward is one concatenation, not a zero-filled copy per slice)."""
        parts = x.split([r1 - r0 for r0, r1 in self.rows])
        return [p.view(n, t, x.shape[-1]) for (n, t), p in zip(self.shapes, parts)]


def _drop_path(module: nn.Module, y: Tensor, layout: PackedLayout) -> Tensor:
    """timm's ``DropPath`` (one keep draw per crop) on the packed stream; identity otherwise."""
    p = float(getattr(module, "drop_prob", 0.0) or 0.0)
    if p == 0.0 or not module.training:
        return y
    keep = 1.0 - p
    mask = y.new_empty(layout.n_crops).bernoulli_(keep)
    if keep > 0.0 and getattr(module, "scale_by_keep", True):
        mask.div_(keep)
    return y * mask.index_select(0, layout.crop_index(y.device)).unsqueeze(-1)


def _packed_attention(block: nn.Module, x: Tensor, layout: PackedLayout) -> Tensor:
    """``block.attn`` on the packed stream ``x [rows, D]`` (already normalised), each crop
    attending to its own tokens only."""
    a = block.attn
    qkv = a.qkv(x)
    p = a.attn_drop.p if a.training else 0.0
    outs = []
    for part in layout.split(qkv):
        n, t = part.shape[:2]
        q, k, v = part.view(n, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(a.q_norm(q), a.k_norm(k), v, dropout_p=p)
        outs.append(o.transpose(1, 2).reshape(n * t, -1))
    o = torch.cat(outs) if len(outs) > 1 else outs[0]
    return a.proj_drop(a.proj(a.norm(o)))


def packed_block(
    block: nn.Module, x: Tensor, layout: PackedLayout, subset_above: float | None = None
) -> Tensor:
    """One timm ``Block`` on the packed stream ``x [rows, D]``; attention stays within each crop.

    ``subset_above``: in training, branches whose drop rate is above it take DINOv3's subset form
    (:func:`~dinokit.backbones.stochastic_depth.packed_subset_residual`: the branch on the kept
    crops only, one subset per resolution run); None = timm's ``DropPath`` (:func:`_drop_path`).
    """
    def attn(s: Tensor, lay: PackedLayout) -> Tensor:
        return block.ls1(_packed_attention(block, block.norm1(s), lay))

    if uses_subset(block.drop_path1, block.training, subset_above):
        x = packed_subset_residual(x, layout.shapes, lambda s, runs: attn(s, PackedLayout(runs)),
                                   drop_rate(block.drop_path1))
    else:
        x = x + _drop_path(block.drop_path1, attn(x, layout), layout)
    return _mlp_residual(block, x, layout, subset_above)


def _mlp_residual(block: nn.Module, x: Tensor, layout: PackedLayout, subset_above: float | None) -> Tensor:
    """``x + ls2(mlp(norm2(x)))`` with the block's stochastic depth (per crop of ``layout``)."""
    def mlp(s: Tensor, runs: Sequence[tuple[int, int]] = ()) -> Tensor:
        return block.ls2(block.mlp(block.norm2(s)))

    if uses_subset(block.drop_path2, block.training, subset_above):
        return packed_subset_residual(x, layout.shapes, mlp, drop_rate(block.drop_path2))
    return x + _drop_path(block.drop_path2, mlp(x), layout)


def cls_rows(x: Tensor, layout: PackedLayout) -> Tensor:
    """Token 0 (the CLS token) of every crop of the packed stream ``x [rows, D]``: ``[crops, D]``."""
    parts = [p[:, 0] for p in layout.split(x)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _cls_attention(block: nn.Module, x: Tensor, layout: PackedLayout) -> Tensor:
    """``block.attn`` on the packed stream ``x [rows, D]`` (already normalised) for the CLS query
    of each crop only, against the keys and values of all of the crop's tokens: ``[crops, D]``."""
    a = block.attn
    dim = a.num_heads * a.head_dim
    qkv = a.qkv
    h_cls = cls_rows(x, layout)
    if type(qkv) is nn.Linear:  # the query projection of the CLS rows, keys and values of all rows
        w, b = qkv.weight, qkv.bias
        q = F.linear(h_cls, w[:dim], None if b is None else b[:dim])
        kv = F.linear(x, w[dim:], None if b is None else b[dim:])
    else:  # a wrapped projection (e.g. LoRA): run it whole
        q, kv = qkv(h_cls)[:, :dim], qkv(x)[:, dim:]
    p = a.attn_drop.p if a.training else 0.0
    outs = []
    for q_run, part in zip(q.split([n for n, _ in layout.shapes]), layout.split(kv)):
        n, t = part.shape[:2]
        k, v = part.view(n, t, 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q_run = q_run.view(n, 1, a.num_heads, a.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(a.q_norm(q_run), a.k_norm(k), v, dropout_p=p)
        outs.append(o.reshape(n, dim))  # [n, heads, 1, head_dim] -> [n, heads * head_dim]
    o = torch.cat(outs) if len(outs) > 1 else outs[0]
    return a.proj_drop(a.proj(a.norm(o)))


def cls_only_block(
    block: nn.Module, x: Tensor, layout: PackedLayout, subset_above: float | None = None
) -> Tensor:
    """The CLS rows of ``block(x)`` (a plain timm ``Block``, :func:`packable_block`) on the packed
    stream ``x [rows, D]``: ``[crops, D]``, equal to ``cls_rows(packed_block(block, x, layout))``
    up to float rounding, without the dead rows (see the module docstring).

    Stochastic depth keeps the crop as its unit and draws as the full block does, in the same
    order: timm's ``DropPath`` one keep draw per crop for each branch; the subset form
    (``subset_above``) one ``randperm(crops)`` per run for each branch
    (:func:`~dinokit.backbones.stochastic_depth.packed_subset_cls_residual` for the attention,
    which reads every token of the kept crops). With the same random state it keeps the same
    crops as the full block. Dropout inside the branches (``attn_drop``, ``proj_drop``) draws for
    fewer elements, so its masks differ from the full block's (same distribution).
    """
    def attn(s: Tensor, lay: PackedLayout) -> Tensor:
        return block.ls1(_cls_attention(block, block.norm1(s), lay))

    cls = cls_rows(x, layout)
    cls_layout = PackedLayout([(n, 1) for n, _ in layout.shapes])  # one row per crop
    if uses_subset(block.drop_path1, block.training, subset_above):
        cls = packed_subset_cls_residual(x, cls, layout.shapes, lambda s, runs: attn(s, PackedLayout(runs)),
                                         drop_rate(block.drop_path1))
    else:
        cls = cls + _drop_path(block.drop_path1, attn(x, layout), cls_layout)
    return _mlp_residual(block, cls, cls_layout, subset_above)
