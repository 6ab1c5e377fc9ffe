"""Datasets: your image folders (labels optional), arrays of images, and two small real datasets
that ship with the project's dependencies (Fashion-MNIST from Debian's ``dataset-fashion-mnist``,
scikit-learn's digits) for the demo and the tests. Nothing is downloaded."""

from __future__ import annotations

import gzip
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


class ImageReadError(OSError):
    """An image file that cannot be decoded; the message names the path."""


def _load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if im.mode in ("L", "RGB", "RGBA", "LA", "P") else im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursive, sorted). Items are ``(image, label)``.

    Args:
        root: the folder. With ``labels="auto"``, when every image sits in a first-level
            sub-folder, the sub-folder names are the classes; otherwise images are unlabelled (-1).
        transform: applied to the PIL image.
        strict: fail on the first unreadable file (its path in the error) instead of skipping it
            with a warning and serving the next readable image.
        extensions: file endings accepted (case-insensitive).
        labels: ``"auto"`` or ``"none"``.
    """

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None, *,
                 strict: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 labels: str = "auto"):
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"data directory {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"data path {str(self.root)!r} is not a directory")
        if labels not in ("auto", "none"):
            raise ValueError(f"labels must be 'auto' or 'none', got {labels!r}")
        exts = tuple(e.lower() for e in extensions)
        self.paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        if not self.paths:
            raise FileNotFoundError(
                f"no images found under {str(self.root)!r} (searched recursively for {list(exts)})"
            )
        self.transform, self.strict = transform, strict
        rel = [p.relative_to(self.root) for p in self.paths]
        if labels == "auto" and all(len(r.parts) >= 2 for r in rel):
            self.classes = sorted({r.parts[0] for r in rel})
            index = {c: i for i, c in enumerate(self.classes)}
            self.targets = [index[r.parts[0]] for r in rel]
        else:
            self.classes, self.targets = [], [-1] * len(self.paths)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def _skip(self, path: Path, err: Exception) -> None:
        if str(path) not in self.skipped:
            self.skipped.append(str(path))
            warnings.warn(f"skipping unreadable image {path} ({err}); "
                          f"{len(self.skipped)} skipped so far", stacklevel=3)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for k in range(len(self.paths)):
            i = (index + k) % len(self.paths)
            try:
                img = _load_image(self.paths[i])
            except ImageReadError as e:
                if self.strict:
                    raise
                self._skip(self.paths[i], e)
                continue
            return (self.transform(img) if self.transform else img), self.targets[i]
        raise ImageReadError(f"no readable image under {self.root}")

    def verify(self, progress: bool = False) -> list[str]:
        """Decode every file now; returns the unreadable ones (and drops them unless strict)."""
        from tqdm.auto import tqdm

        bad = []
        for p in tqdm(self.paths, desc="verifying images", disable=not progress):
            try:
                _load_image(p)
            except ImageReadError as e:
                if self.strict:
                    raise
                bad.append(str(p))
                self._skip(p, e)
        if bad:
            keep = [i for i, p in enumerate(self.paths) if str(p) not in set(bad)]
            self.paths = [self.paths[i] for i in keep]
            self.targets = [self.targets[i] for i in keep]
        return bad

    def summary(self) -> str:
        return (f"{len(self.paths)} images under {self.root}, {len(self.classes)} classes, "
                f"{len(self.skipped)} unreadable file(s) skipped")


def load_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip-compressed or raw."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read idx file {p}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{p} is not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{p} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


class _ArrayImages(Dataset):
    """uint8 images ``[N, H, W]`` with labels, served as PIL 'L' images."""

    classes: list[str]

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None):
        self.images, self.labels, self.transform = images, labels, transform
        self.targets = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[i], mode="L")
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def _first(images: np.ndarray, labels: np.ndarray, limit: int | None):
    """The first ``limit`` items (the files are already shuffled across classes)."""
    if limit is None:
        return images, labels
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return images[:limit], labels[:limit]


class FashionMNISTDataset(_ArrayImages):
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grayscale images, 10 classes, read from the
    idx files of Debian's ``dataset-fashion-mnist``. ``limit`` keeps the first N items."""

    def __init__(self, root: str | Path = FASHION_MNIST_ROOT, split: str = "train",
                 transform: Callable | None = None, limit: int | None = None):
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        files = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files not found: {missing}; install them with `{FASHION_MNIST_INSTALL}`"
            )
        images, labels = _first(load_idx(files[0]), load_idx(files[1]), limit)
        super().__init__(images, labels, transform)
        self.classes = list(FASHION_MNIST_CLASSES)


class DigitsDataset(_ArrayImages):
    """scikit-learn's bundled digits (1,797 8x8 images, 10 classes), scaled to 0..255, split
    deterministically (stratified) into train and test."""

    def __init__(self, split: str = "train", transform: Callable | None = None,
                 test_fraction: float = 0.25, seed: int = 0, limit: int | None = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        d = load_digits()
        images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
        tr, te = train_test_split(np.arange(len(images)), test_size=test_fraction, random_state=seed,
                                  stratify=d.target)
        idx = tr if split == "train" else te
        images, labels = _first(images[idx], d.target[idx], limit)
        super().__init__(images, labels, transform)
        self.classes = [str(i) for i in range(10)]


def fashion_mnist_available(root: str | Path = FASHION_MNIST_ROOT) -> bool:
    return (Path(root) / "train-images-idx3-ubyte.gz").is_file()


def load_demo_dataset(name: str = "auto", split: str = "train", transform: Callable | None = None,
                      limit: int | None = None, root: str | Path | None = None) -> Dataset:
    """``fashion-mnist``, ``digits``, or ``auto`` (Fashion-MNIST when installed, else digits with a
    warning saying how to get Fashion-MNIST)."""
    root = root or FASHION_MNIST_ROOT
    if name == "auto":
        if fashion_mnist_available(root):
            name = "fashion-mnist"
        else:
            warnings.warn(f"Fashion-MNIST not found under {root}; using scikit-learn's digits. "
                          f"For the real demo data run `{FASHION_MNIST_INSTALL}`", stacklevel=2)
            name = "digits"
    if name == "fashion-mnist":
        return FashionMNISTDataset(root, split, transform, limit)
    if name == "digits":
        return DigitsDataset(split, transform, limit=limit)
    raise ValueError(f"unknown demo dataset {name!r}; use 'auto', 'fashion-mnist' or 'digits'")


class TensorImageDataset(Dataset):
    """Images held in an array ``[N, C, H, W]`` or ``[N, H, W]`` (numpy or torch, uint8 or float)."""

    def __init__(self, images: Any, labels: Any = None, transform: Callable | None = None):
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W] or [N, H, W], got shape {tuple(x.shape)}")
        if labels is not None and len(labels) != len(x):
            raise ValueError(f"{len(labels)} labels for {len(x)} images")
        self.images, self.transform = x, transform
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels)).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.images[i]
        y = -1 if self.labels is None else int(self.labels[i])
        return (self.transform(img) if self.transform else img), y


class TransformDataset(Dataset):
    """Any dataset whose items are an image or ``(image, label, ...)``, with a transform applied."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        item = self.dataset[i]
        if isinstance(item, (tuple, list)):
            img, y = item[0], (int(item[1]) if len(item) > 1 and item[1] is not None else -1)
        else:
            img, y = item, -1
        return self.transform(img), y
