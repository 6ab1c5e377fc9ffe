"""DINO's self-attention maps (Caron et al. 2021, Fig. 1 and 3): the last block's attention from
the CLS token to the patches, one map per head; register tokens are left out."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dinokit.viz._figure import displayable, new_figure, save


@torch.no_grad()
def cls_attention_maps(backbone, images: Tensor) -> Tensor:
    """``[B, heads, h, w]``: CLS-to-patch attention of the last block, each head summing to 1 over
    the patches (CLS and registers dropped, then renormalised)."""
    if not getattr(backbone, "supports_attention", False):
        raise TypeError(f"attention maps need a ViT backbone, got {type(backbone).__name__}; "
                        "use PCA maps of patch features instead (dinokit viz pca)")
    if not backbone.has_cls_token:
        raise TypeError("attention maps need a ViT with a CLS token")
    attn = backbone.last_self_attention(images)  # [B, H, T, T]
    p = backbone.num_prefix_tokens
    maps = attn[:, :, 0, p:]
    maps = maps / maps.sum(-1, keepdim=True)
    h, w = backbone.grid_size(images.shape[-2], images.shape[-1])
    return maps.reshape(images.shape[0], -1, h, w)


def threshold_attention(maps: Tensor, mass: float = 0.6) -> Tensor:
    """DINO's threshold mode: keep the smallest set of highest patches holding ``mass`` of each
    map's attention. ``maps [..., h, w]`` -> bool of the same shape."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    flat = maps.flatten(-2)
    flat = flat / flat.sum(-1, keepdim=True)
    values, order = flat.sort(dim=-1, descending=True)
    before = values.cumsum(-1) - values  # mass of the strictly higher patches
    keep_sorted = before < mass - 1e-9
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def plot_attention(image: Tensor, maps: Tensor, path: str | Path, *, threshold: float | None = None,
                   title: str | None = None, mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None) -> Path:
    """Image, one panel per head and their mean, overlaid (and thresholded when asked)."""
    img = displayable(image, mean, std)
    size = image.shape[-2:]
    panels = [(f"head {i}", maps[i]) for i in range(maps.shape[0])] + [("mean", maps.mean(0))]
    rows = 2 if threshold is not None else 1
    fig = new_figure(2.0 * (len(panels) + 1), 2.1 * rows)
    cmap = "gray" if img.ndim == 2 else None
    for r in range(rows):
        ax = fig.add_subplot(rows, len(panels) + 1, r * (len(panels) + 1) + 1)
        ax.imshow(img, cmap=cmap)
        ax.set_title("image" if r == 0 else f"kept {threshold:.0%} mass", fontsize=8)
        ax.axis("off")
        for j, (name, m) in enumerate(panels):
            shown = m if r == 0 else threshold_attention(m, threshold).float()
            up = F.interpolate(shown[None, None].float(), size=size, mode="nearest")[0, 0]
            ax = fig.add_subplot(rows, len(panels) + 1, r * (len(panels) + 1) + j + 2)
            ax.imshow(img, cmap=cmap)
            ax.imshow(up.cpu().numpy(), cmap="inferno", alpha=0.6)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path)
