"""Collate multi-crop items into one batch dict, with iBOT masks for DINOv2/v3.

Batch: ``{"global_views": [n_global x [B, C, H, W]], "local_views": [n_local x [B, C, h, w]],
"labels": LongTensor [B] (-1 = unlabelled), "masks": BoolTensor [n_global * B, N] or None}``.
Masks follow ``torch.cat(global_views)`` (view-major). As in DINOv2's collate, a fraction
``mask_probability`` of the global crops is masked, crop ``i`` of those with a ratio drawn in the
``i``-th equal slice of ``mask_ratio_range``; the rest are unmasked; the order is shuffled.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class MultiCropCollate:
    """Picklable collate function (DataLoader workers).

    Args:
        mask_generator: ``(num_masking_patches, rng) -> BoolTensor [N]`` (see
            :func:`dinokit.masking.make_mask_generator`), or None for no masks (DINO v1).
        patch_size: the ViT patch size (N = (H // patch) * (W // patch)).
        mask_probability: fraction of global crops that get masked.
        mask_ratio_range: range of masked-patch ratios.
        seed: base seed of the mask randomness (mixed with the batch's content-free counter).
    """

    def __init__(self, mask_generator: Callable[..., Tensor] | None = None, patch_size: int | None = None,
                 mask_probability: float = 0.5, mask_ratio_range: tuple[float, float] = (0.1, 0.5),
                 seed: int = 0):
        if not 0.0 <= mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
        lo, hi = mask_ratio_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"mask_ratio_range must be ordered within [0, 1], got {mask_ratio_range}")
        if mask_generator is not None and patch_size is None:
            raise ValueError("patch_size is required with a mask_generator")
        self.mask_generator, self.patch_size = mask_generator, patch_size
        self.mask_probability, self.mask_ratio_range = mask_probability, (lo, hi)
        self.seed = seed

    @staticmethod
    def _stack(items: list[dict[str, list[Tensor]]], key: str) -> list[Tensor]:
        n = len(items[0][key])
        for i, it in enumerate(items):
            if len(it[key]) != n:
                raise ValueError(f"item {i} has {len(it[key])} {key} but item 0 has {n}")
        out = []
        for v in range(n):
            shapes = {tuple(it[key][v].shape) for it in items}
            if len(shapes) > 1:
                raise ValueError(f"{key}[{v}] differs in shape across items: {sorted(shapes)}")
            out.append(torch.stack([it[key][v] for it in items]))
        return out

    def masks(self, n_crops: int, n_patches: int, rng: random.Random) -> Tensor:
        """``[n_crops, n_patches]`` masks: ``mask_probability`` of the crops masked, ratios spread."""
        n_masked = int(n_crops * self.mask_probability)
        lo, hi = self.mask_ratio_range
        edges = [lo + (hi - lo) * i / max(n_masked, 1) for i in range(n_masked + 1)]
        rows = [self.mask_generator(int(n_patches * rng.uniform(edges[i], edges[i + 1])), rng)
                for i in range(n_masked)]
        rows += [torch.zeros(n_patches, dtype=torch.bool)] * (n_crops - n_masked)
        rng.shuffle(rows)
        return torch.stack(rows)

    def __call__(self, batch: list[tuple[dict[str, list[Tensor]], int]]) -> dict[str, Any]:
        if not batch:
            raise ValueError("empty batch")
        views = [b[0] for b in batch]
        for i, v in enumerate(views):
            if not isinstance(v, dict) or "global_views" not in v:
                raise TypeError(f"item {i} must be a dict with 'global_views' (a MultiCropTransform output)")
        g = self._stack(views, "global_views")
        loc = self._stack(views, "local_views") if views[0].get("local_views") else []
        labels = torch.tensor([int(b[1]) if len(b) > 1 else -1 for b in batch], dtype=torch.long)
        masks = None
        if self.mask_generator is not None:
            h, w = g[0].shape[-2:]
            n_patches = (h // self.patch_size) * (w // self.patch_size)
            # Seeded from the torch RNG, which SeededViews/worker seeding make reproducible.
            rng = random.Random(int(torch.randint(0, 2**62, (1,))) ^ self.seed)
            masks = self.masks(len(g) * len(batch), n_patches, rng)
        return {"global_views": g, "local_views": loc, "labels": labels, "masks": masks}
