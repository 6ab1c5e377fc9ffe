"""Collate multi-crop items into one batch dict, with iBOT patch masks for DINOv2/v3.

Items: ``(views, label)`` with ``views = {"global_views": [Tensor C x H x W] * n_global,
"local_views": [Tensor C x h x w] * n_local}`` (a :class:`~dinokit.data.MultiCropTransform`
output); a bare ``views`` dict or a None label counts as unlabelled. Batch::

    {"global_views": [Tensor B x C x H x W] * n_global,
     "local_views":  [Tensor B x C x h x w] * n_local   ([] when n_local = 0),
     "labels":       LongTensor [B]                     (-1 = unlabelled),
     "masks":        BoolTensor [n_global * B, N] or None,
     # with a mask generator only (DINOv2/v3), as the official ``collate_data_and_cast``:
     "mask_indices": LongTensor [U]   flat indices into [n_global * B * N], padded with 0,
     "mask_weights": FloatTensor [U]  1 / (masked count of the token's crop), 0 = padding,
     "n_masked":     LongTensor []    number of real (unpadded) entries}

``masks`` rows follow ``torch.cat(global_views)`` (view-major: row ``v * B + b`` is view ``v`` of
image ``b``), ``N = (H // patch_size) * (W // patch_size)``, True = masked. As in DINOv2's
``collate_data_and_cast``: ``int(n_global * B * mask_probability)`` crops are masked, crop ``i``
of them with ``int(N * r_i)`` patches, ``r_i`` uniform in the ``i``-th of the
``torch.linspace(low, high, n_masked + 1)`` slices (``ratio_sampling="uniform"``; DINOv3 takes
the slice's upper end, ``"upper"``, and may roll each mask by a random circular shift); the
others are unmasked; then the rows are shuffled. ``U`` (:meth:`MultiCropCollate.upper_bound`) is
the official ``upperbound``, ``sum_i int(N * prob_max_i)``: it depends only on the batch
geometry, so the masked-token buffers keep one shape from batch to batch (no recompilation, no
host sync in the step).

``mask_sampling="sample"`` (a dinokit option; the default ``"batch"`` is the official rule above)
draws the masks of each image on its own, from a seed of that image (given by
:class:`~dinokit.train.loader.SeededCollate` from ``(seed, epoch, sample index)``): each of its
global crops is masked with probability ``mask_probability``, with ``int(N * r)`` patches, ``r``
uniform in ``mask_ratio_range`` (whatever ``ratio_sampling``), then the generator's own draws
(block positions) and the circular shift. A sample's masks then do not depend on the batch it
lands in, so a run gives the same masks at any world size. The number of masked crops varies from
batch to batch (binomial, same mean), so ``U`` is then ``n_global * B * int(N * high)`` (more
padded tokens through the patch head: about 3x the official bound with the default ratios);
``mask_weights`` keep the official meaning.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dinokit.masking import check_ratio, check_ratio_range


def _takes_rng(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts a second positional argument (the random source)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class MultiCropCollate:
    """Picklable collate function for a DataLoader over multi-crop items (see module docstring).

    Args:
        mask_generator: ``(num_masking_patches[, rng]) -> bool mask of N patches`` (any shape with
            N elements, tensor or array), e.g. :func:`dinokit.masking.make_mask_generator`; it is
            given a ``random.Random`` when it takes a second argument. None = no masks (DINO v1).
        patch_size: the backbone's patch size; required with a ``mask_generator``.
        mask_probability: fraction of the ``n_global * B`` global crops that are masked.
        mask_ratio_range: ``(low, high)`` masked-patch ratios of the masked crops.
        ratio_sampling: ``"uniform"`` (DINOv2: a ratio drawn in each crop's slice) or ``"upper"``
            (DINOv3: the slice's upper end).
        random_circular_shift: roll each mask by a random shift of the patch grid (DINOv3's
            ``mask_random_circular_shift``, off by default there too).
        mask_sampling: ``"batch"`` (official: the masked crops and their ratios spread over the
            batch) or ``"sample"`` (each image's masks from its own seed; see the module docstring).

    Mask randomness comes from one draw of torch's global generator per batch, so it follows
    ``torch.manual_seed`` and DataLoader workers' per-worker seeds. With ``mask_sampling="sample"``
    it comes from ``sample_seeds`` (one int per item) when the caller passes them, else from one
    draw of torch's global generator per item.
    """

    def __init__(self, mask_generator: Callable[..., Any] | None = None,
                 patch_size: int | None = None, mask_probability: float = 0.5,
                 mask_ratio_range: Sequence[float] = (0.1, 0.5), ratio_sampling: str = "uniform",
                 random_circular_shift: bool = False, mask_sampling: str = "batch"):
        if mask_generator is not None and not callable(mask_generator):
            raise TypeError(f"mask_generator must be callable or None, "
                            f"got {type(mask_generator).__name__}")
        if mask_generator is not None and patch_size is None:
            raise ValueError("patch_size is required with a mask_generator (N = (H//p) * (W//p))")
        if patch_size is not None and (
            isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1
        ):
            raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
        self.mask_generator, self.patch_size = mask_generator, patch_size
        self.mask_probability = check_ratio("mask_probability", mask_probability)
        self.mask_ratio_range = check_ratio_range("mask_ratio_range", mask_ratio_range)
        if ratio_sampling not in ("uniform", "upper"):
            raise ValueError(f"ratio_sampling must be 'uniform' (DINOv2) or 'upper' (DINOv3), "
                             f"got {ratio_sampling!r}")
        self.ratio_sampling, self.random_circular_shift = ratio_sampling, bool(random_circular_shift)
        if mask_sampling not in ("batch", "sample"):
            raise ValueError(f"mask_sampling must be 'batch' (official) or 'sample', got {mask_sampling!r}")
        self.mask_sampling = mask_sampling
        self._pass_rng = mask_generator is not None and _takes_rng(mask_generator)

    # ------------------------------------------------------------------------------ stacking
    @staticmethod
    def _stack(views: list[dict[str, Any]], key: str) -> list[Tensor]:
        """``[n_views x Tensor [B, ...]]``; errors name the first item disagreeing with item 0."""
        first = views[0].get(key, [])
        for i, v in enumerate(views):
            crops = v.get(key, [])
            if not isinstance(crops, (list, tuple)):
                raise TypeError(f"item {i}: {key} must be a list of tensors, "
                                f"got {type(crops).__name__}")
            if len(crops) != len(first):
                raise ValueError(f"item {i} has {len(crops)} {key} but item 0 has {len(first)}")
            for j, (crop, ref) in enumerate(zip(crops, first)):
                if not isinstance(crop, Tensor):
                    raise TypeError(f"item {i}: {key}[{j}] must be a tensor, "
                                    f"got {type(crop).__name__}")
                if crop.shape != ref.shape:
                    raise ValueError(f"item {i} has {key}[{j}] of shape {tuple(crop.shape)} but "
                                     f"item 0 has {tuple(ref.shape)}")
        return [torch.stack([v[key][j] for v in views]) for j in range(len(first))]

    @staticmethod
    def _split(batch: Sequence[Any]) -> tuple[list[dict[str, Any]], list[int]]:
        views, labels = [], []
        for i, item in enumerate(batch):
            if isinstance(item, dict):
                view, label = item, None
            elif isinstance(item, (tuple, list)) and item and isinstance(item[0], dict):
                view, label = item[0], item[1] if len(item) > 1 else None
            else:
                raise TypeError(f"item {i} must be (views dict, label) as made by "
                                f"MultiCropTransform, got {type(item).__name__}")
            if "global_views" not in view:
                raise ValueError(f"item {i} has no 'global_views' (keys: {sorted(view)})")
            views.append(view)
            labels.append(-1 if label is None else int(label))
        return views, labels

    # --------------------------------------------------------------------------------- masks
    def _probs(self, n_masked: int) -> Tensor:
        """The official ``torch.linspace(low, high, n_masked + 1)`` (float32)."""
        return torch.linspace(*self.mask_ratio_range, n_masked + 1)

    def upper_bound(self, batch_size: int, n_patches: int, n_global: int = 2) -> int:
        """``U``: the most masked tokens a batch of ``batch_size`` images (``n_global`` crops
        each, ``n_patches`` patches per crop) can carry: ``sum_i int(N * prob_max_i)`` over the
        ``int(n_global * batch_size * mask_probability)`` masked crops (DINOv2's ``upperbound``).
        With ``mask_sampling="sample"``: every crop may be masked, ``n_global * B * int(N * high)``."""
        if self.mask_sampling == "sample":
            n_crops = n_global * batch_size if self.mask_probability > 0 else 0
            return n_crops * int(n_patches * self.mask_ratio_range[1])
        n_masked = int(n_global * batch_size * self.mask_probability)
        probs = self._probs(n_masked)
        return sum(int(n_patches * probs[i + 1]) for i in range(n_masked))

    def make_masks(self, n_crops: int, n_patches: int, rng: random.Random,
                   grid: tuple[int, int] | None = None) -> Tensor:
        """BoolTensor ``[n_crops, n_patches]``: DINOv2's spread of ratios over the masked crops.

        Random draws in the official order (ratio, then the generator's own draws, per masked
        crop; then the shuffle), all from ``rng``. ``grid`` (rows, cols) is needed only for
        ``random_circular_shift``.
        """
        assert self.mask_generator is not None
        n_masked = int(n_crops * self.mask_probability)
        probs = self._probs(n_masked)
        rows = []
        for i in range(n_masked):
            if self.ratio_sampling == "uniform":
                ratio = probs[i] + (probs[i + 1] - probs[i]) * rng.random()  # random.uniform, float32
            else:
                ratio = probs[i + 1]
            rows.append(self._generate(int(n_patches * ratio), n_patches, rng, grid))
        rows += [torch.zeros(n_patches, dtype=torch.bool) for _ in range(n_crops - n_masked)]
        rng.shuffle(rows)
        return torch.stack(rows)

    def _generate(self, count: int, n_patches: int, rng: random.Random,
                  grid: tuple[int, int] | None) -> Tensor:
        """One crop's flat mask of at most ``count`` patches (the generator's draws, then the
        optional circular shift), from ``rng``."""
        assert self.mask_generator is not None
        out = self.mask_generator(count, rng) if self._pass_rng else self.mask_generator(count)
        mask = torch.as_tensor(out).bool().flatten()
        if mask.numel() != n_patches:
            raise ValueError(f"mask_generator gave {mask.numel()} patches but the global crops "
                             f"have N = {n_patches} (check its grid against "
                             f"patch_size={self.patch_size})")
        if int(mask.sum()) > count:
            raise ValueError(f"mask_generator masked {int(mask.sum())} patches when asked for "
                             f"at most {count}")
        if self.random_circular_shift:
            if grid is None:
                raise ValueError("random_circular_shift needs the patch grid (rows, cols)")
            shift = (rng.randint(0, grid[0] - 1), rng.randint(0, grid[1] - 1))
            mask = torch.roll(mask.reshape(grid), shift, (0, 1)).flatten()
        return mask

    def sample_masks(self, n_global: int, n_patches: int, seed: int,
                     grid: tuple[int, int] | None = None) -> Tensor:
        """BoolTensor ``[n_global, n_patches]``: one image's masks under ``mask_sampling="sample"``,
        a function of ``seed`` only. Per crop, from ``random.Random(seed)``: masked or not
        (``rng.random() < mask_probability``), the ratio ``low + (high - low) * rng.random()``,
        then (masked crops only) the generator's draws and the circular shift."""
        rng = random.Random(int(seed))
        low, high = self.mask_ratio_range
        rows = []
        for _ in range(n_global):
            masked = rng.random() < self.mask_probability
            ratio = low + (high - low) * rng.random()
            if masked:
                rows.append(self._generate(int(n_patches * ratio), n_patches, rng, grid))
            else:
                rows.append(torch.zeros(n_patches, dtype=torch.bool))
        return torch.stack(rows)

    def batch_masks(self, n_images: int, n_global: int, grid: tuple[int, int],
                    sample_seeds: Sequence[int] | None = None) -> dict[str, Tensor]:
        """``masks [n_global * n_images, N]`` (view-major rows) with ``mask_indices``,
        ``mask_weights`` and ``n_masked`` for a batch, by the ``mask_sampling`` rule."""
        n_patches = grid[0] * grid[1]
        if self.mask_sampling == "sample":
            if sample_seeds is None:
                sample_seeds = torch.randint(0, 2**62, (n_images,)).tolist()
            if len(sample_seeds) != n_images:
                raise ValueError(f"sample_seeds has {len(sample_seeds)} seeds for {n_images} items")
            per_image = torch.stack([self.sample_masks(n_global, n_patches, s, grid) for s in sample_seeds])
            masks = per_image.transpose(0, 1).flatten(0, 1)  # row v * B + b
        else:
            rng = random.Random(int(torch.randint(0, 2**62, (1,))))
            masks = self.make_masks(n_global * n_images, n_patches, rng, grid)
        return {"masks": masks, **self.index_masks(masks, self.upper_bound(n_images, n_patches, n_global))}

    @staticmethod
    def index_masks(masks: Tensor, upper_bound: int) -> dict[str, Tensor]:
        """``mask_indices [U]``, ``mask_weights [U]`` and ``n_masked []`` of ``masks [n_crops, N]``
        (official ``mask_indices_list`` / ``masks_weight`` / ``n_masked_patches``), zero-padded."""
        flat = masks.flatten().nonzero().flatten()
        n = flat.numel()
        if n > upper_bound:
            raise ValueError(f"{n} masked patches exceed the upper bound {upper_bound}")
        weights = (1.0 / masks.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(masks)[masks]
        indices = torch.zeros(upper_bound, dtype=torch.long)
        indices[:n] = flat
        padded = torch.zeros(upper_bound, dtype=torch.float32)
        padded[:n] = weights
        return {"mask_indices": indices, "mask_weights": padded,
                "n_masked": torch.tensor(n, dtype=torch.long)}

    def __call__(self, batch: Sequence[Any], sample_seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """The batch dict; ``sample_seeds`` (one per item) are used by ``mask_sampling="sample"``."""
        if len(batch) == 0:
            raise ValueError("batch is empty")
        views, labels = self._split(batch)
        global_views = self._stack(views, "global_views")
        if not global_views:
            raise ValueError("items have no global views (n_global must be >= 1)")
        masks, extra = None, {}
        if self.mask_generator is not None:
            shapes = {tuple(g.shape[-2:]) for g in global_views}
            if len(shapes) > 1:
                raise ValueError(f"masks need global views of one size, got {sorted(shapes)}")
            h, w = global_views[0].shape[-2:]
            assert self.patch_size is not None
            grid = (h // self.patch_size, w // self.patch_size)
            extra = self.batch_masks(len(views), len(global_views), grid, sample_seeds)
            masks = extra.pop("masks")
        return {
            "global_views": global_views,
            "local_views": self._stack(views, "local_views"),
            "labels": torch.tensor(labels, dtype=torch.long),
            "masks": masks,
            **extra,
        }

    def __repr__(self) -> str:
        if self.mask_generator is None:
            return "MultiCropCollate(masks=None)"
        return (f"MultiCropCollate(mask_generator={self.mask_generator!r}, "
                f"patch_size={self.patch_size}, mask_probability={self.mask_probability}, "
                f"mask_ratio_range={self.mask_ratio_range}, ratio_sampling={self.ratio_sampling!r}, "
                f"random_circular_shift={self.random_circular_shift}, "
                f"mask_sampling={self.mask_sampling!r})")
