"""Efficient stochastic depth (DINOv2, Oquab et al. 2024; DINOv3, Siméoni et al. 2025).

Stochastic depth (Huang et al., ECCV 2016) drops a block's residual branch for a random part of
the batch during training. timm's ``DropPath`` computes the branch for every sample and multiplies
it by a per-sample 0/1 mask scaled by ``1 / keep``: the dropped samples cost as much as the kept
ones. DINOv2/DINOv3 instead draw a subset of ``k = max(int(b * (1 - rate)), 1)`` of the ``b``
samples (``randperm(b)[:k]``), run the branch on those only and add it back with
``index_add(x, 0, idx, branch(x[idx]), alpha=b / k)``: about ``rate`` of the branch's compute is
saved, and ``E[out] = x + branch(x)`` as with ``DropPath`` (each sample is kept with probability
``k / b``). Unlike ``DropPath``, exactly ``k`` samples are kept in every draw. The attention and
the MLP branch of a block each get their own draw.

DINOv3 uses it whenever training with ``rate > 0``; DINOv2 only for ``rate > 0.1`` ("the overhead
is compensated only for a drop path rate larger than 0.1"), plain ``DropPath`` below. On a
sequence-packed stream (several resolution runs of crops, see :mod:`dinokit.backbones.packed`)
the unit dropped is a crop, with one subset per run, as in DINOv3's ``_forward_list``. A
CLS-only last block (:func:`~dinokit.backbones.packed.cls_only_block`) keeps the crop as the unit
and draws exactly as the full block (:func:`packed_subset_cls_residual`): same keep decisions
under the same random state, so training with it is the same, not only in law.

All draws stay on the device (``torch.randperm(..., device=x.device)``): no host sync, no Python
loop over samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from timm.layers import DropPath
from torch import Tensor, nn

#: ``drop_path_mode`` values a backbone accepts: timm's per-sample ``DropPath`` or the subset form.
DROP_PATH_MODES = ("sample", "subset")


def subset_size(n: int, rate: float) -> int:
    """Samples kept out of ``n`` at drop rate ``rate``: ``max(int(n * (1 - rate)), 1)`` (the
    official formula, float rounding included: ``subset_size(100, 0.9) == 9``)."""
    return max(int(n * (1 - rate)), 1)


def draw_subset(
    n: int, rate: float, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Indices of the kept samples, ``[subset_size(n, rate)]``: a uniform random subset, drawn on
    ``device``."""
    return torch.randperm(n, device=device, generator=generator)[: subset_size(n, rate)]


def drop_rate(module: nn.Module | None) -> float:
    """Drop probability of a ``DropPath``-like module (0 for ``Identity`` or ``None``)."""
    return float(getattr(module, "drop_prob", 0.0) or 0.0)


def subset_residual(
    x: Tensor, branch: Callable[[Tensor], Tensor], rate: float, generator: torch.Generator | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``x + branch(x)`` with stochastic depth: the branch runs on a random subset of the samples
    of ``x [B, ...]`` only and is added back scaled by ``B / k``; ``rate <= 0`` gives the plain
    residual. ``branch`` must act on each sample independently.

    ``residual`` (``[B, ...]``, default ``x``): the stream the branch is added to, when it is not
    ``x`` itself (the CLS-only last block: the branch reads every token of the kept samples and
    returns their CLS rows only). The draw is the same ``randperm(B)`` either way."""
    res = x if residual is None else residual
    if rate <= 0.0:
        return res + branch(x)
    b = x.shape[0]
    idx = draw_subset(b, rate, x.device, generator)
    return torch.index_add(res, 0, idx, branch(x[idx]).to(res.dtype), alpha=b / subset_size(b, rate))


def packed_subset_residual(
    x: Tensor,
    runs: Sequence[tuple[int, int]],
    branch: Callable[[Tensor, list[tuple[int, int]]], Tensor],
    rate: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`subset_residual` on a packed stream ``x [rows, D]`` made of ``runs`` (``(crops,
    tokens_per_crop)`` each, in stream order): a crop is the unit dropped, one subset per run.

    ``branch(rows, sub_runs)`` gets the kept crops' rows, still packed run after run (``sub_runs``
    their layout), and returns one row per input row. Each run's part is added back scaled by
    ``crops / kept`` of that run.
    """
    if rate <= 0.0:
        return x + branch(x, list(runs))
    idxs = _draw_runs(runs, rate, x.device, generator)
    rows, sub_runs, start = [], [], 0
    for (n, t), idx in zip(runs, idxs):
        tok = torch.arange(t, device=x.device)
        rows.append((start + idx[:, None] * t + tok).reshape(-1))
        sub_runs.append((subset_size(n, rate), t))
        start += n * t
    y = branch(x.index_select(0, torch.cat(rows) if len(rows) > 1 else rows[0]), sub_runs).to(x.dtype)
    return _add_runs(x, runs, sub_runs, rows, y.split([k * t for k, t in sub_runs]))


def packed_subset_cls_residual(
    x: Tensor,
    cls: Tensor,
    runs: Sequence[tuple[int, int]],
    branch: Callable[[Tensor, list[tuple[int, int]]], Tensor],
    rate: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`packed_subset_residual` of a branch that reads every token of a crop but whose
    output is needed for its CLS row only (the CLS-only last block's attention): ``cls [crops, D]``
    (one row per crop, stream order) gets ``branch(rows, sub_runs)``, which reads the kept crops'
    rows of ``x [rows, D]`` and returns one row per kept crop.

    The draws are those of :func:`packed_subset_residual` on ``x`` (one ``randperm(crops)`` per
    run, in run order), so a CLS-only forward keeps the same crops as the full block would with
    the same random state.
    """
    if rate <= 0.0:
        return cls + branch(x, list(runs))
    idxs = _draw_runs(runs, rate, x.device, generator)
    rows, cls_rows, sub_runs, start, crop0 = [], [], [], 0, 0
    for (n, t), idx in zip(runs, idxs):
        tok = torch.arange(t, device=x.device)
        rows.append((start + idx[:, None] * t + tok).reshape(-1))
        cls_rows.append(crop0 + idx)
        sub_runs.append((subset_size(n, rate), t))
        start, crop0 = start + n * t, crop0 + n
    y = branch(x.index_select(0, torch.cat(rows) if len(rows) > 1 else rows[0]), sub_runs).to(cls.dtype)
    return _add_runs(cls, runs, sub_runs, cls_rows, y.split([k for k, _ in sub_runs]))


def _draw_runs(
    runs: Sequence[tuple[int, int]], rate: float, device: torch.device, generator: torch.Generator | None
) -> list[Tensor]:
    """One kept subset of crops per run, drawn in run order."""
    return [draw_subset(n, rate, device, generator) for n, _ in runs]


def _add_runs(out: Tensor, runs: Sequence[tuple[int, int]], sub_runs: Sequence[tuple[int, int]],
              rows: Sequence[Tensor], parts: Sequence[Tensor]) -> Tensor:
    """Add each run's branch rows ``parts`` at ``rows`` of ``out``, scaled by ``crops / kept``."""
    for i, ((n, _), (k, _), r, p) in enumerate(zip(runs, sub_runs, rows, parts)):
        # the first index_add copies out; the others add in place into that copy
        out = torch.index_add(out, 0, r, p, alpha=n / k) if i == 0 else out.index_add_(0, r, p, alpha=n / k)
    return out


def uses_subset(module: nn.Module | None, training: bool, subset_above: float | None) -> bool:
    """Whether the branch guarded by ``module`` (a ``DropPath`` or ``Identity``) takes the subset
    form: in training, with ``subset_above`` set (None = timm's ``DropPath``) and the module's
    rate above it (DINOv3: 0; DINOv2: 0.1)."""
    return training and subset_above is not None and drop_rate(module) > subset_above


def subset_block(block: nn.Module, x: Tensor, subset_above: float | None = 0.0) -> Tensor:
    """A pre-norm timm ``Block`` (``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``) on
    ``x [B, T, D]`` with each branch whose rate (``drop_path1``/``drop_path2``) is above
    ``subset_above`` in the subset form (:func:`subset_residual`) and the others through the
    block's own drop-path modules; equal to ``block(x)`` in eval mode."""
    def attn(s: Tensor) -> Tensor:
        return block.ls1(block.attn(block.norm1(s)))

    def mlp(s: Tensor) -> Tensor:
        return block.ls2(block.mlp(block.norm2(s)))

    for branch, dp in ((attn, block.drop_path1), (mlp, block.drop_path2)):
        if uses_subset(dp, block.training, subset_above):
            x = subset_residual(x, branch, drop_rate(dp))
        else:
            x = x + dp(branch(x))
    return x


def set_uniform_drop_path(blocks: Iterable[nn.Module], rate: float) -> int:
    """Give every block's drop-path slots (``drop_path``, ``drop_path1``, ``drop_path2``) the same
    ``rate`` (DINOv2's ``drop_path_uniform``, DINOv3's only rule) instead of timm's
    ``linspace(0, rate, depth)``; slots timm left as ``Identity`` (rate 0) get a ``DropPath``.
    Returns the number of slots set."""
    n = 0
    for blk in blocks:
        for name in ("drop_path", "drop_path1", "drop_path2"):
            mod = getattr(blk, name, None)
            if isinstance(mod, DropPath):
                mod.drop_prob = float(rate)
            elif isinstance(mod, nn.Identity):
                setattr(blk, name, DropPath(float(rate)))
            else:
                continue
            n += 1
    return n
