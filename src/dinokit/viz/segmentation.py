"""Segmentation pictures: images above their ground-truth masks above the probe's predictions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from torch import Tensor

from dinokit.viz._figure import displayable, new_figure, save


def colour_masks(mask: Tensor, n_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Class ids ``[H, W]`` -> RGB ``[H, W, 3]`` in [0, 1]: class 0 black (the background of the
    built-in scenes), the others from a qualitative palette, ignored pixels white."""
    palette = colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
    colours = np.concatenate([np.zeros((1, 3)), palette[np.arange(max(0, n_classes - 1)) % 20]])
    m = mask.detach().cpu().numpy().astype(np.int64)
    out = colours[np.clip(m, 0, n_classes - 1)]
    if ignore_index is not None:
        out[m == ignore_index] = 1.0
    return out


def plot_segmentation(images: Tensor, masks: Sequence[Tensor], predictions: Sequence[Tensor],
                      path: str | Path, n_classes: int, *, mean: tuple[float, ...] | None = None,
                      std: tuple[float, ...] | None = None, ignore_index: int | None = None,
                      title: str | None = None) -> Path:
    """Three rows, one column per image: the image, its mask, the prediction."""
    n = images.shape[0]
    fig = new_figure(1.6 * n, 5.2)
    rows = [("image", None), ("mask", masks), ("prediction", predictions)]
    for r, (name, maps) in enumerate(rows):
        for i in range(n):
            ax = fig.add_subplot(3, n, r * n + i + 1)
            if maps is None:
                img = displayable(images[i], mean, std)
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            else:
                ax.imshow(colour_masks(maps[i], n_classes, ignore_index), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title or "linear segmentation probe: image / mask / prediction", fontsize=9)
    return save(fig, path)
