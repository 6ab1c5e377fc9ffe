"""A 2-D map of features (t-SNE or PCA), coloured by label."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from torch import Tensor

from dinokit.viz._figure import new_figure, save


def plot_embedding_2d(features: Tensor, labels: Tensor | None, path: str | Path, *, method: str = "tsne",
                      class_names: Sequence[str] | None = None, seed: int = 0,
                      max_points: int = 5000) -> Path:
    """Scatter plot of ``features [N, D]`` reduced to 2-D (deterministic subsample above
    ``max_points``)."""
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    x = features.detach().float().cpu().numpy()
    y = None if labels is None else labels.cpu().numpy()
    if len(x) > max_points:
        idx = np.random.default_rng(seed).choice(len(x), max_points, replace=False)
        x = x[idx]
        y = None if y is None else y[idx]
    if method == "tsne":
        perplexity = min(30.0, max(2.0, len(x) / 4))
        xy = TSNE(2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x)
    else:
        xy = PCA(2, random_state=seed).fit_transform(x)
    fig = new_figure(6.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    if y is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4)
    else:
        for c in np.unique(y):
            name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
            pts = xy[y == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=4, label=name)
        ax.legend(fontsize=7, markerscale=3, loc="best")
    ax.set_title(f"{method.upper()} of {len(x)} feature vectors", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return save(fig, path)
