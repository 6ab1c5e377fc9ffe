"""A folder of images with segmentation masks: ``images/`` and ``masks/`` side by side.

The common layout of segmentation data (ADE20K, Pascal VOC, Cityscapes exports): every image
``images/<name>.<ext>`` has a mask ``masks/<name>.png`` of the same height and width whose pixel
values are class ids (single-channel PNG: mode L, P or I;16); an ``ignore_index`` (255 by
default) marks pixels that are not scored. The folder is checked when it is opened, so that a
mistake is one clear error naming the file, before any feature is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinokit.data.datasets import IMAGE_EXTENSIONS, read_image

#: Pixel value of unscored pixels in masks (the convention of ADE20K's and VOC's PNGs).
DEFAULT_IGNORE_INDEX = 255
_MASK_MODES = ("L", "P", "I;16", "I", "1")


class MaskFolderError(OSError):
    """A segmentation folder that does not hold together; the message names the file."""


def read_mask(path: str | Path) -> np.ndarray:
    """The class ids of a single-channel mask PNG as int64 ``[H, W]``."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in _MASK_MODES:
                raise MaskFolderError(f"mask {path} is a {mode} image: masks must be single-channel PNGs of "
                                      "class ids (mode L, P or I;16)")
            return np.asarray(im, dtype=np.int64)
    except MaskFolderError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError...
        raise MaskFolderError(f"cannot read mask {path}: {type(e).__name__}: {e}") from e


def _image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the image's header."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:
        raise MaskFolderError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return h, w


class MaskFolderDataset(Dataset):
    """Pairs ``(transform(image), mask long [H, W])`` from ``root/images`` and ``root/masks``.

    Args:
        root: the folder holding ``images/`` and ``masks/``.
        transform: applied to the PIL image (the mask is kept at the image's own resolution).
        n_classes: the class ids allowed are ``0 .. n_classes - 1`` (and ``ignore_index``); None =
            one more than the largest id found.
        ignore_index: pixels of this value are not scored.

    Raises :class:`MaskFolderError` (one line naming the file) for a missing folder, an image without
    a mask, a mask without an image, a mask whose size differs from its image's, a mask that is not
    single-channel, and a class id outside ``0 .. n_classes - 1``.

    Attributes: ``paths`` and ``mask_paths`` (sorted, matching), ``n_classes``, ``ignore_index``,
    ``classes`` (the ids as strings).
    """

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None, *,
                 n_classes: int | None = None, ignore_index: int = DEFAULT_IGNORE_INDEX):
        self.root = Path(root)
        images, masks = self.root / "images", self.root / "masks"
        for folder in (self.root, images, masks):
            if not folder.is_dir():
                raise MaskFolderError(f"segmentation folder {folder} does not exist: the layout is "
                                      f"{self.root}/images/<name>.<ext> with {self.root}/masks/<name>.png")
        self.paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.paths:
            raise MaskFolderError(f"no images in {images} (looked for {list(IMAGE_EXTENSIONS)})")
        by_stem = {p.stem: p for p in sorted(masks.iterdir()) if p.suffix.lower() == ".png"}
        stems = [p.stem for p in self.paths]
        dup = next((s for s in stems if stems.count(s) > 1), None)
        if dup is not None:
            twins = [p.name for p in self.paths if p.stem == dup]
            raise MaskFolderError(f"images {images / twins[0]} and {images / twins[1]} share the mask name "
                                  f"{masks / (dup + '.png')}: give images distinct names")
        for p in self.paths:
            if p.stem not in by_stem:
                raise MaskFolderError(f"image {p} has no mask: expected {masks / (p.stem + '.png')}")
        extra = sorted(set(by_stem) - set(stems))
        if extra:
            raise MaskFolderError(f"mask {by_stem[extra[0]]} has no image in {images}")
        self.mask_paths = [by_stem[s] for s in stems]
        self.transform, self.ignore_index = transform, int(ignore_index)
        self.n_classes = self._check(n_classes)
        self.classes = [str(c) for c in range(self.n_classes)]

    def _check(self, n_classes: int | None) -> int:
        """Every mask against its image and the class range; returns the number of classes."""
        if n_classes is not None and n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        largest = -1
        for image, mask_path in zip(self.paths, self.mask_paths, strict=True):
            mask = read_mask(mask_path)
            if mask.shape != _image_size(image):
                raise MaskFolderError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                                      f"{image} is {_image_size(image)[1]}x{_image_size(image)[0]} (width x "
                                      "height): they must match")
            ids = np.unique(mask)
            ids = ids[ids != self.ignore_index]
            if len(ids) and ids[0] < 0:
                raise MaskFolderError(f"mask {mask_path} holds class id {int(ids[0])}: ids must be >= 0")
            if n_classes is not None and len(ids) and ids[-1] >= n_classes:
                raise MaskFolderError(f"mask {mask_path} holds class id {int(ids[-1])}, outside "
                                      f"0..{n_classes - 1} "
                                      f"(n_classes={n_classes}; ignore index {self.ignore_index})")
            if len(ids):
                largest = max(largest, int(ids[-1]))
        if n_classes is None:
            if largest < 0:
                raise MaskFolderError(f"every mask under {self.root / 'masks'} holds only the ignore index "
                                      f"{self.ignore_index}: nothing to score")
            return largest + 1
        return int(n_classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        img = read_image(self.paths[index])
        mask = torch.from_numpy(read_mask(self.mask_paths[index]))
        return (self.transform(img) if self.transform is not None else img), mask
