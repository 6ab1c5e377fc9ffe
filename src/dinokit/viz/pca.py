"""PCA maps of patch features (popularised by DINOv2, Oquab et al. 2024, Fig. 1): PCA fitted on
the patches of all images together; the first component separates foreground from background;
the first three components of the foreground patches become RGB."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dinokit.viz._figure import displayable, new_figure, save


@dataclass
class PCAMaps:
    """``rgb [B, h, w, 3]`` in [0, 1], ``foreground [B, h, w]`` bool."""

    rgb: Tensor
    foreground: Tensor


def _pca(x: Tensor, k: int) -> Tensor:
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:k].T


@torch.no_grad()
def pca_patch_maps(patch_tokens: Tensor, grid: tuple[int, int], *, n_components: int = 3,
                   foreground_threshold: float | None = 0.0) -> PCAMaps:
    """``patch_tokens [B, N, D]`` on an ``(h, w)`` grid -> :class:`PCAMaps`.

    The first component's sign is chosen so that the border of the patch grid (mostly background
    in object-centred images) falls below ``foreground_threshold``; ``None`` keeps every patch.
    """
    b, n, d = patch_tokens.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {grid} has {h * w} cells but there are {n} patch tokens")
    flat = patch_tokens.reshape(b * n, d).float()
    first = _pca(flat, 1)[:, 0]
    first = first / (first.abs().max() + 1e-8)
    if foreground_threshold is None:
        fg = torch.ones_like(first, dtype=torch.bool)
    else:
        border = torch.ones(h, w, dtype=torch.bool)
        border[1:-1, 1:-1] = False
        border = border.flatten().repeat(b)
        above = first > foreground_threshold
        if h > 2 and w > 2 and above[border].float().mean() > above[~border].float().mean():
            first = -first
        fg = first > foreground_threshold
        if int(fg.sum()) < n_components + 1:
            fg = torch.ones_like(fg)
    comps = torch.zeros(b * n, n_components)
    k = min(n_components, d, int(fg.sum()))
    comps[fg, :k] = _pca(flat[fg], k)
    lo = comps[fg].min(0).values
    hi = comps[fg].max(0).values
    rgb = ((comps - lo) / (hi - lo + 1e-8)).clamp(0, 1)
    rgb[~fg] = 0
    if n_components < 3:
        rgb = torch.cat([rgb, torch.zeros(b * n, 3 - n_components)], 1)
    return PCAMaps(rgb[:, :3].reshape(b, h, w, 3), fg.reshape(b, h, w))


def plot_pca(images: Tensor, maps: PCAMaps, path: str | Path, mean: tuple[float, ...] | None = None,
             std: tuple[float, ...] | None = None) -> Path:
    """Each image above its PCA map."""
    n = images.shape[0]
    fig = new_figure(1.8 * n, 3.8)
    for i in range(n):
        img = displayable(images[i], mean, std)
        ax = fig.add_subplot(2, n, i + 1)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.axis("off")
        ax = fig.add_subplot(2, n, n + i + 1)
        ax.imshow(maps.rgb[i].numpy(), interpolation="nearest")
        ax.axis("off")
    fig.suptitle("patch features: first 3 PCA components of the foreground as RGB", fontsize=9)
    return save(fig, path)
