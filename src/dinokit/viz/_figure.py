"""Matplotlib figures without pyplot's global state (importing dinokit changes nothing global)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinokit.atomic import atomic_write


def new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

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


def displayable(image: Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> Any:
    """``[C, H, W]`` tensor (normalised or not) -> ``[H, W(, 3)]`` numpy array in [0, 1]."""
    x = image.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
