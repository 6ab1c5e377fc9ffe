"""Matplotlib figures without pyplot's global state (importing dinokit changes nothing global)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from dinokit.atomic import atomic_write


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches at 100 dpi, outside pyplot's figure manager."""
    return Figure(figsize=(width, height), dpi=100)


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (format from its ending, PNG when it has none: ``.png`` is added),
    atomically (:mod:`dinokit.atomic`)."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    with atomic_write(path) as f:
        fig.savefig(f, format=path.suffix[1:].lower(), dpi=100, bbox_inches="tight")
    return path


def band_composite(image: Tensor) -> Tensor:
    """A multi-band ``[C, H, W]`` image shown as RGB: its first three principal components over the
    pixels (per image), each stretched to [0, 1] between its 1st and 99th percentile; ``[H, W, 3]``."""
    c, h, w = image.shape
    x = image.reshape(c, -1).T.double()
    x = x - x.mean(0, keepdim=True)
    k = min(3, c)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comps = x @ v[:k].T
    lo, hi = torch.quantile(comps, 0.01, dim=0), torch.quantile(comps, 0.99, dim=0)
    comps = ((comps - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    if k < 3:
        comps = torch.cat([comps, comps[:, :1].expand(-1, 3 - k)], dim=1)
    return comps.reshape(h, w, 3).float()


def displayable(image: Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> Any:
    """``[C, H, W]`` tensor (normalised or not) -> ``[H, W(, 3)]`` numpy array in [0, 1]; multi-band
    images (C other than 1 or 3) as the RGB of their principal components (:func:`band_composite`)."""
    x = image.detach().float().cpu()
    if x.shape[0] not in (1, 3):
        return band_composite(x).numpy()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
