"""A dense task that needs no download: scenes composed from Fashion-MNIST items.

Each scene is a dark ``canvas x canvas`` grey image on which a few Fashion-MNIST items (Xiao et
al. 2017) are pasted at random positions and sizes. The per-pixel label is the class of the item
whose ink covers the pixel (``class + 1``), and 0 (background) wherever no item has ink; an item
pasted later covers the ones below it, in the image and in the labels alike. It is a toy
segmentation task, not a benchmark of the literature: it checks that patch features locate and
tell apart objects, which k-NN and linear probes on the CLS token cannot show.

With one item per scene the same generator gives a classification set whose objects sit at a
random position and scale: raw pixels no longer line up across images as they do in
Fashion-MNIST's centred items, as objects in photos do not.

Scenes are deterministic: scene ``i`` of a split depends on ``(seed, split, i)`` only (not on how
many scenes are asked for). The ``test`` split is built from Fashion-MNIST's test images only, so
it is held out from everything the ``train`` split shows. Without Fashion-MNIST (Debian's
``dataset-fashion-mnist``), scikit-learn's digits are the items, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinokit.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_INSTALL,
    FASHION_MNIST_ROOT,
    DigitsDataset,
    FashionMNISTDataset,
    fashion_mnist_available,
)

#: Label of the pixels no item's ink covers.
BACKGROUND = 0
#: Item pixels at or above this grey value (0..255, after resizing) are ink: they are pasted and
#: labelled; the rest of the item's square leaves the canvas as it was.
INK_THRESHOLD = 32
_SPLIT_IDS = {"train": 0, "test": 1}

Target = Literal["none", "class", "mask"]


@dataclass(frozen=True)
class SceneLayout:
    """How the scenes are drawn.

    Attributes:
        canvas: side of the square scene in pixels.
        items: ``(min, max)`` items per scene, inclusive.
        scale: ``(min, max)`` side of a pasted item as a fraction of the canvas side.
        ink: item pixels at or above this grey value are ink.
    """

    canvas: int = 56
    items: tuple[int, int] = (2, 3)
    scale: tuple[float, float] = (0.3, 0.55)
    ink: int = INK_THRESHOLD

    def __post_init__(self) -> None:
        if self.canvas < 4:
            raise ValueError(f"canvas must be >= 4, got {self.canvas}")
        if not 1 <= self.items[0] <= self.items[1]:
            raise ValueError(f"items must be (min, max) with 1 <= min <= max, got {self.items}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ink <= 255:
            raise ValueError(f"ink must be in 1..255, got {self.ink}")


#: Several items per scene: the segmentation task.
SCENES = SceneLayout()
#: One item per scene at a random position and scale: the classification set.
SINGLE_ITEM = SceneLayout(items=(1, 1), scale=(0.3, 0.7))


@dataclass(frozen=True)
class Placement:
    """One pasted item: its index among the source items, its class, and its square on the canvas."""

    item: int
    label: int
    top: int
    left: int
    side: int


def place_items(n_sources: int, layout: SceneLayout, rng: np.random.Generator,
                labels: np.ndarray) -> list[Placement]:
    """The random placements of one scene, drawn from ``rng`` (items in pasting order)."""
    k = int(rng.integers(layout.items[0], layout.items[1] + 1))
    out = []
    for _ in range(k):
        item = int(rng.integers(n_sources))
        side = max(2, min(layout.canvas, round(float(rng.uniform(*layout.scale)) * layout.canvas)))
        top = int(rng.integers(0, layout.canvas - side + 1))
        left = int(rng.integers(0, layout.canvas - side + 1))
        out.append(Placement(item, int(labels[item]), top, left, side))
    return out


def paste(items: np.ndarray, placements: list[Placement],
          layout: SceneLayout) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 [H, W], mask uint8 [H, W])`` of the placements pasted in order on a black
    canvas; mask values: :data:`BACKGROUND` or ``class + 1`` where the item's ink lies."""
    image = np.zeros((layout.canvas, layout.canvas), dtype=np.uint8)
    mask = np.full((layout.canvas, layout.canvas), BACKGROUND, dtype=np.uint8)
    for p in placements:
        src = Image.fromarray(np.ascontiguousarray(items[p.item]))
        resized = np.asarray(src.resize((p.side, p.side), Image.Resampling.BILINEAR))
        ink = resized >= layout.ink
        window = (slice(p.top, p.top + p.side), slice(p.left, p.left + p.side))
        image[window][ink] = resized[ink]
        mask[window][ink] = p.label + 1
    return image, mask


def scene_items(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images uint8 [N, h, w], labels [N], class names)`` the scenes of ``split`` are made of:
    Fashion-MNIST's split when its files are under ``root``, else scikit-learn's digits (warning)."""
    root = Path(root) if root is not None else Path(FASHION_MNIST_ROOT)
    if fashion_mnist_available(root):
        ds: Any = FashionMNISTDataset(root, split)
        return ds.images, np.asarray(ds.targets), list(FASHION_MNIST_CLASSES)
    warnings.warn(f"Fashion-MNIST not found under {root}: the scenes are made of scikit-learn's 8x8 digits. "
                  f"For Fashion-MNIST run: `{FASHION_MNIST_INSTALL}`", stacklevel=3)
    ds = DigitsDataset(split)
    return ds.images, np.asarray(ds.targets), list(ds.classes)


class SceneDataset(Dataset):
    """Scenes of items on a larger canvas (see the module docstring), drawn on demand.

    Args:
        split: ``train`` (from the training items) or ``test`` (from the held-out test items).
        n_scenes: how many scenes.
        transform: applied to the PIL 'L' scene (None = the PIL image).
        target: what comes with each image: ``mask`` (a long ``[H, W]`` tensor of class ids, 0 =
            background), ``class`` (the class of the last item pasted: the only one with
            :data:`SINGLE_ITEM`) or ``none`` (-1).
        layout: :data:`SCENES` (several items) or :data:`SINGLE_ITEM` or your own.
        seed: scene ``i`` depends on ``(seed, split, i)`` only.
        items: ``(images uint8 [N, h, w], labels [N])`` to draw from instead of Fashion-MNIST (for
            tests and your own item sets); ``class_names`` then names their labels.

    Attributes: ``classes`` (the names of the target's classes: for masks ``background`` first),
    ``ignore_index`` (None: every pixel is labelled).
    """

    ignore_index = None

    def __init__(self, split: str = "train", n_scenes: int = 10000,
                 transform: Callable[[Any], Any] | None = None, *, target: Target = "mask",
                 layout: SceneLayout = SCENES, seed: int = 0,
                 items: tuple[np.ndarray, np.ndarray] | None = None, class_names: list[str] | None = None,
                 root: str | Path | None = None):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if isinstance(n_scenes, bool) or not isinstance(n_scenes, int) or n_scenes < 1:
            raise ValueError(f"n_scenes must be an int >= 1, got {n_scenes!r}")
        if target not in ("none", "class", "mask"):
            raise ValueError(f"target must be 'none', 'class' or 'mask', got {target!r}")
        if items is None:
            images, labels, names = scene_items(split, root)
        else:
            images, labels = np.asarray(items[0], dtype=np.uint8), np.asarray(items[1]).astype(np.int64)
            names = class_names or [str(c) for c in range(int(labels.max()) + 1)]
        if images.ndim != 3 or len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"items must be images [N, h, w] with N labels, got {images.shape} and "
                             f"{labels.shape}")
        self.split, self.n_scenes, self.transform, self.target = split, n_scenes, transform, target
        self.layout, self.seed = layout, int(seed)
        self.item_images, self.item_labels = images, labels
        self.item_classes = list(names)
        self.classes = ["background", *names] if target == "mask" else list(names)

    def __len__(self) -> int:
        return self.n_scenes

    def placements(self, index: int) -> list[Placement]:
        """The items pasted in scene ``index``, in order."""
        if not 0 <= index < self.n_scenes:
            raise IndexError(f"scene {index} out of range for {self.n_scenes} scenes")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        return place_items(len(self.item_images), self.layout, rng, self.item_labels)

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image uint8 [H, W], mask uint8 [H, W])`` of scene ``index``."""
        return paste(self.item_images, self.placements(index), self.layout)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if index < 0:
            index += self.n_scenes
        image, mask = self.scene(index)
        img = Image.fromarray(image)
        x = self.transform(img) if self.transform is not None else img
        if self.target == "mask":
            return x, torch.from_numpy(mask.astype(np.int64))
        if self.target == "class":
            return x, self.placements(index)[-1].label
        return x, -1


#: Scenes per split when no limit is given (the size of Fashion-MNIST's test split for "test").
DEFAULT_SCENES = {"train": 10000, "test": 2000}
#: The built-in dataset names: ``scenes`` (several items per scene) and ``scene-items`` (one).
SCENE_DATASETS = {"scenes": SCENES, "scene-items": SINGLE_ITEM}


def scene_dataset(name: str, split: str, transform: Callable[[Any], Any] | None = None,
                  limit: int | None = None, *, target: Target | None = None) -> SceneDataset:
    """A built-in scene set by name (``data.dataset``): ``scenes`` gives unlabelled images (or
    ``target="mask"`` for the segmentation probe), ``scene-items`` images labelled by their one
    item's class; ``limit`` scenes (default :data:`DEFAULT_SCENES`), always with seed 0, so every
    run and evaluation sees the same scenes."""
    if name not in SCENE_DATASETS:
        raise ValueError(f"name must be one of {list(SCENE_DATASETS)}, got {name!r}")
    default = "none" if name == "scenes" else "class"
    return SceneDataset(split, limit or DEFAULT_SCENES[split], transform, target=target or default,
                        layout=SCENE_DATASETS[name])
