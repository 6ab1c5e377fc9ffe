"""Patch masks for masked-image-modelling objectives (iBOT, Zhou et al. ICLR 2022; DINOv2).

* :class:`BlockMaskGenerator`: BEiT's block-wise masking (Bao et al. ICLR 2022, Alg. 1), as the
  official iBOT/DINOv2/DINOv3 ``MaskingGenerator``: random rectangles with a log-uniform aspect
  ratio are added until the target count is reached, never exceeding it.
* :func:`random_mask`: independent uniform masking with an exact count per image, vectorised.
* :func:`make_mask_generator`: either kind behind one callable that the collate uses.

Masks are made in the data pipeline (the collate), not in the forward pass; ``True`` = masked.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

#: Anything the generators accept as a source of randomness.
RandomSource = random.Random | np.random.Generator | torch.Generator | int | None

class MaskGenerator(Protocol):
    """What the collate calls: ``(num_masking_patches, rng=None) -> BoolTensor [num_patches]``."""

    num_patches: int

    def __call__(self, num_masking_patches: int, rng: RandomSource = None) -> Tensor: ...


#: Tries to place one block before giving up on it (BEiT/iBOT/DINOv2 use 10).
BLOCK_ATTEMPTS = 10


def check_ratio(name: str, value: float) -> float:
    """``value`` as a float in [0, 1]; the error names ``name`` (e.g. ``mask_ratio``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_ratio_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` with ``0 <= low <= high <= 1``; the error names ``name``."""
    try:
        low, high = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (low, high), got {value!r}") from None
    low, high = check_ratio(name, low), check_ratio(name, high)
    if low > high:
        raise ValueError(f"{name} must be ordered (low <= high), got {tuple(value)}")
    return low, high


def as_python_rng(rng: RandomSource) -> random.Random:
    """One ``random.Random`` from any accepted source (a numpy/torch generator gives one draw)."""
    if isinstance(rng, random.Random):
        return rng
    if rng is None or (isinstance(rng, int) and not isinstance(rng, bool)):
        return random.Random(rng)
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(0, 2**63 - 1)))
    if isinstance(rng, torch.Generator):
        return random.Random(int(torch.randint(0, 2**62, (1,), generator=rng)))
    raise TypeError(
        "rng must be a random.Random, numpy Generator, torch Generator, int seed or None, "
        f"got {type(rng).__name__}"
    )


def _check_grid(grid: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be (rows, cols) of the patch grid, got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"grid must have positive rows and cols, got {tuple(grid)}")
    return h, w


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_count(num_masking_patches: int, num_patches: int) -> int:
    n = num_masking_patches
    if not _is_int(n):
        raise TypeError(f"num_masking_patches must be an int, got {type(n).__name__}")
    if not 0 <= n <= num_patches:
        raise ValueError(f"num_masking_patches must be in [0, {num_patches}] (the grid), got {n}")
    return int(n)


def official_max_num_patches(img_size: int, patch_size: int) -> float:
    """``max_num_patches`` exactly as DINOv2/v3 ``train.py`` compute it:
    ``0.5 * img_size // patch_size * img_size // patch_size`` (left to right, so ``0.5 * N`` when
    the grid side is even; e.g. 128.0 for 224 px and 14-px patches)."""
    return 0.5 * img_size // patch_size * img_size // patch_size


class BlockMaskGenerator:
    """BEiT/iBOT/DINOv2 block masks on an ``(h, w)`` patch grid (the official ``MaskingGenerator``,
    dinov2 ``data/masking.py``); ``__call__`` gives BoolTensor ``[h, w]``.

    While fewer than the target are masked, one block is added: up to ``BLOCK_ATTEMPTS`` tries of
    an area ``uniform(min_num_patches, min(remaining, max_num_patches))`` (also when the remaining
    budget is below ``min_num_patches``: Python's ``uniform`` then draws in the reversed range, so
    small blocks fill the last few patches), a log-uniform aspect ratio, ``h_b = round(sqrt(area *
    aspect))``, ``w_b = round(sqrt(area / aspect))``, kept only if ``w_b < cols`` and ``h_b < rows``
    (strict) and the newly masked patches are in ``1..remaining``. Placing stops at the target or
    when a block fails all its tries, so the count can fall short of the target. Random draws are
    made in the official order from one ``random.Random``, so a seed gives the official mask.

    Args:
        grid: patch grid ``(rows, cols)``, e.g. ``(14, 14)`` for 224 px and 16-px patches.
        min_num_patches: smallest block area drawn (4 in BEiT/iBOT/DINOv2).
        max_num_patches: largest block area; None = ``0.5 * rows * cols`` (DINOv2/v3 ``train.py``;
            see :func:`official_max_num_patches` for their exact expression from pixel sizes).
        min_aspect: smallest aspect ratio (0.3).
        max_aspect: largest aspect ratio; None = ``1 / min_aspect``.
    """

    def __init__(self, grid: tuple[int, int], min_num_patches: int = 4,
                 max_num_patches: float | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        self.grid = _check_grid(grid)
        if not _is_int(min_num_patches) or min_num_patches < 1:
            raise ValueError(f"min_num_patches must be an int >= 1, got {min_num_patches!r}")
        if max_num_patches is None:
            max_num_patches = 0.5 * self.grid[0] * self.grid[1]
        if isinstance(max_num_patches, bool) or not isinstance(max_num_patches, (int, float)) \
                or max_num_patches < 1:
            raise ValueError(f"max_num_patches must be a number >= 1, got {max_num_patches!r}")
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not max_aspect >= min_aspect:
            raise ValueError(f"max_aspect must be >= min_aspect ({min_aspect}), got {max_aspect}")
        self.min_num_patches, self.max_num_patches = min_num_patches, max_num_patches
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: random.Random) -> int:
        """One block adding ``1..max_mask_patches`` new patches; returns how many (0 = none fitted)."""
        rows, cols = self.grid
        for _ in range(BLOCK_ATTEMPTS):
            area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect = math.exp(rng.uniform(*self._log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < cols and h < rows:
                top, left = rng.randint(0, rows - h), rng.randint(0, cols - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: RandomSource = None) -> Tensor:
        """BoolTensor ``[h, w]`` with at most ``num_masking_patches`` True; ``rng``: a
        ``random.Random``, numpy/torch generator or int seed (None = fresh entropy)."""
        target = _check_count(num_masking_patches, self.num_patches)
        py_rng = as_python_rng(rng)
        mask = np.zeros(self.grid, dtype=bool)
        count = 0
        while count < target:
            added = self._add_block(mask, min(target - count, self.max_num_patches), py_rng)
            if added == 0:
                break
            count += added
        return torch.from_numpy(mask)

    def __repr__(self) -> str:
        return (f"BlockMaskGenerator(grid={self.grid}, min_num_patches={self.min_num_patches}, "
                f"max_num_patches={self.max_num_patches}, "
                f"aspect=[{self.min_aspect:.3g}, {self.max_aspect:.3g}])")


def random_mask(n_images: int, n_patches: int, ratio: float,
                generator: torch.Generator | None = None, device: Any = None) -> Tensor:
    """BoolTensor ``[n_images, n_patches]`` with exactly ``round(ratio * n_patches)`` True per row,
    uniformly placed: the ``k`` smallest of i.i.d. uniform noise (argsort, no loop over images)."""
    ratio = check_ratio("mask_ratio", ratio)
    if n_images < 0 or n_patches < 0:
        raise ValueError(f"n_images and n_patches must be >= 0, got {n_images} and {n_patches}")
    k = int(round(ratio * n_patches))
    noise = torch.rand(n_images, n_patches, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise within its row
    return ranks < k


class _FlatBlockMasks:
    """``(num_masking_patches, rng=None) -> BoolTensor [h * w]`` from block masks (picklable)."""

    def __init__(self, grid: tuple[int, int], **kwargs: Any):
        self.block = BlockMaskGenerator(grid, **kwargs)
        self.grid, self.num_patches = self.block.grid, self.block.num_patches

    def __call__(self, num_masking_patches: int, rng: RandomSource = None) -> Tensor:
        return self.block(num_masking_patches, rng).flatten()

    def __repr__(self) -> str:
        return f"make_mask_generator('block') -> {self.block!r}"


class _FlatRandomMasks:
    """``(num_masking_patches, rng=None) -> BoolTensor [h * w]``, exactly that many, uniform."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = _check_grid(grid)
        self.num_patches = self.grid[0] * self.grid[1]

    def __call__(self, num_masking_patches: int, rng: RandomSource = None) -> Tensor:
        k = _check_count(num_masking_patches, self.num_patches)
        mask = torch.zeros(self.num_patches, dtype=torch.bool)
        mask[as_python_rng(rng).sample(range(self.num_patches), k)] = True
        return mask

    def __repr__(self) -> str:
        return f"make_mask_generator('random', grid={self.grid})"


def make_mask_generator(mode: str, grid: tuple[int, int], **kwargs: Any) -> MaskGenerator:
    """A picklable ``(num_masking_patches, rng=None) -> BoolTensor [h * w]`` for the collate.

    ``mode="block"``: :class:`BlockMaskGenerator` (``kwargs`` are its options), at most that many
    patches; ``mode="random"``: exactly that many patches, uniformly placed (no options).
    """
    if mode == "block":
        return _FlatBlockMasks(grid, **kwargs)
    if mode == "random":
        if kwargs:
            raise TypeError(f"mode='random' takes no options, got {sorted(kwargs)}")
        return _FlatRandomMasks(grid)
    raise ValueError(f"mode must be 'block' or 'random', got {mode!r}")
