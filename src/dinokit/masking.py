"""Patch masks for masked-image objectives (iBOT, Zhou et al. ICLR 2022; DINOv2).

* :class:`BlockMaskGenerator`: BEiT's block-wise masking (Bao et al. ICLR 2022): random rectangles
  of at least ``min_num_patches`` patches, aspect ratio log-uniform in ``[min_aspect, max_aspect]``,
  added until the target count is reached, never exceeding it.
* :func:`random_mask`: the simple per-image random masking of seed 004, vectorised.

Masks are made in the data pipeline (collate), not in the forward pass.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from torch import Tensor


def _check_ratio(name: str, r: float) -> None:
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {r}")


class BlockMaskGenerator:
    """Block masks on an ``(h, w)`` patch grid.

    Args:
        grid: patch grid ``(rows, cols)``.
        min_num_patches: smallest block (4, as BEiT/iBOT).
        max_num_patches: largest block (default: no limit beyond the target).
        min_aspect, max_aspect: aspect-ratio range (default ``[0.3, 1/0.3]``), sampled log-uniformly.
    """

    def __init__(self, grid: tuple[int, int], min_num_patches: int = 4, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.h, self.w = int(grid[0]), int(grid[1])
        if self.h < 1 or self.w < 1:
            raise ValueError(f"grid must be positive, got {grid}")
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @property
    def num_patches(self) -> int:
        return self.h * self.w

    def _add_block(self, mask: Tensor, budget: int, rng: random.Random) -> int:
        delta = 0
        for _ in range(10):
            hi = budget if self.max_num_patches is None else min(budget, self.max_num_patches)
            if hi < self.min_num_patches:
                return 0
            area = rng.uniform(self.min_num_patches, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.h and 0 < w < self.w and h * w >= self.min_num_patches:
                top, left = rng.randint(0, self.h - h), rng.randint(0, self.w - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    delta = new
                    break
        return delta

    def __call__(self, num_masking_patches: int, rng: random.Random | int | None = None) -> Tensor:
        """A ``[h, w]`` bool mask with at most ``num_masking_patches`` patches set."""
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        mask = torch.zeros(self.h, self.w, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            delta = self._add_block(mask, num_masking_patches - count, rng)
            if delta == 0:
                break
            count += delta
        return mask


def random_mask(n_images: int, n_patches: int, ratio: float,
                generator: torch.Generator | None = None) -> Tensor:
    """``[n_images, n_patches]`` bool, exactly ``round(ratio * n_patches)`` True per row."""
    _check_ratio("mask_ratio", ratio)
    k = int(round(ratio * n_patches))
    order = torch.rand(n_images, n_patches, generator=generator).argsort(dim=1)
    mask = torch.zeros(n_images, n_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def make_mask_generator(mode: str, grid: tuple[int, int], **kwargs) -> Callable[..., Tensor]:
    """``(num_masking_patches, rng) -> BoolTensor [h * w]`` for ``"block"`` or ``"random"`` masks."""
    if mode == "block":
        gen = BlockMaskGenerator(grid, **kwargs)
        return _FlatBlock(gen)
    if mode == "random":
        return _FlatRandom(grid[0] * grid[1])
    raise ValueError(f"mask_mode must be 'block' or 'random', got {mode!r}")


class _FlatBlock:
    def __init__(self, gen: BlockMaskGenerator):
        self.gen = gen
        self.num_patches = gen.num_patches

    def __call__(self, n: int, rng: random.Random | None = None) -> Tensor:
        return self.gen(n, rng).flatten()


class _FlatRandom:
    def __init__(self, num_patches: int):
        self.num_patches = num_patches

    def __call__(self, n: int, rng: random.Random | None = None) -> Tensor:
        rng = rng or random.Random()
        mask = torch.zeros(self.num_patches, dtype=torch.bool)
        mask[rng.sample(range(self.num_patches), min(n, self.num_patches))] = True
        return mask
