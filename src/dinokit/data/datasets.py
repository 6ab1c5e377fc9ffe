"""Datasets: your image folders (labels optional), in-memory image arrays, any dataset with a
transform, and two small real datasets that need no download: Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package and scikit-learn's bundled digits.

Every item is ``(image or views, label)``; unlabelled items have label ``-1``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinokit.data.multicrop import to_l_or_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm", ".pnm")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")

Transform = Callable[[Any], Any]
#: Default of ``data.max_image_pixels``: images with more pixels are refused as decompression
#: bombs. Pillow's own default (89 Mpx) refuses genuine photos of today's 100 and 150 Mpx medium-
#: format cameras; 250 Mpx admits them and 16k x 15k scans, while a refused file still costs no
#: memory (the check reads the header only), and an admitted RGB image decodes to at most 750 MB.
DEFAULT_MAX_IMAGE_PIXELS = 250_000_000


class ImageReadError(OSError):
    """An image file that cannot be decoded; the message names the path."""


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _check_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    return limit


def _label(y: Any) -> int:
    """A label as a Python int; None (no label) becomes -1."""
    return -1 if y is None else int(y)


# ---------------------------------------------------------------------------------- image folder
@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit (a module global) set to ``max_pixels`` for a block."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def read_image(path: str | Path, mode: str | None = None, *,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode ``path`` into a PIL image of mode L or RGB (or ``mode`` when given).

    Raises :class:`ImageReadError` naming the path for any undecodable or truncated file, and for
    a decompression bomb: more than ``max_pixels`` pixels (``data.max_image_pixels``), refused by
    Pillow's own check on the header, before anything is decoded (Pillow's warning for 1 to 2
    times its limit is treated as an error). 16-bit, palette, CMYK and alpha images are converted
    (see ``to_l_or_rgb``).
    """
    try:
        with warnings.catch_warnings(), _pixel_limit(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now: truncated files fail here, not later in a transform
                img = to_l_or_rgb(im)
                if img is im:
                    img = im.copy()  # detach from the closed file
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"cannot read image {path}: refused as a decompression bomb ({e})") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return img.convert(mode) if mode and img.mode != mode else img


def _scan(root: Path, extensions: tuple[str, ...], strict: bool = False) -> list[Path]:
    """Sorted image files under ``root``, following symlinked folders but never one twice (a
    symlink loop is visited once). A folder that cannot be listed is reported with a warning
    naming it (an error with ``strict``)."""
    found, seen = [], set()

    def unreadable(e: OSError) -> None:
        msg = f"cannot list folder {e.filename}: {e.strerror or e}; its images are left out"
        if strict:
            raise ImageReadError(msg)
        warnings.warn(msg, stacklevel=4)

    for dirpath, dirnames, names in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()  # visit in a fixed order: which of two links is kept is deterministic
        found += [Path(dirpath) / n for n in names if os.path.splitext(n)[1].lower() in extensions]
    return sorted(found)


def folder_labels(root: Path, paths: list[Path], labels: str = "auto") -> tuple[list[str], list[int]]:
    """``(classes, targets)`` of files under ``root``: with ``labels="auto"`` and every file in a
    sub-folder, the first-level sub-folders are the classes (sorted) and each file's target is its
    class index; otherwise no classes and every target -1."""
    parts = [p.relative_to(root).parts for p in paths]
    if labels == "auto" and all(len(q) >= 2 for q in parts):
        classes = sorted({q[0] for q in parts})
        index = {c: i for i, c in enumerate(classes)}
        return classes, [index[q[0]] for q in parts]
    return [], [-1] * len(paths)


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursive, paths sorted); items ``(transform(image), label)``.

    Images are decoded with PIL as mode L (grey) or RGB as found (alpha composited on white, other
    modes converted, see :func:`~dinokit.data.multicrop.to_l_or_rgb`): channel conversion is the
    transform's job. ``mode="RGB"`` or ``"L"`` forces one mode for transforms that need it.

    Args:
        root: the folder.
        transform: applied to the PIL image (None = the PIL image itself).
        strict: raise :class:`ImageReadError` (naming the path) at the first unreadable file;
            default: warn naming it, remember it in ``skipped`` and serve the next readable
            image (index + 1, + 2, ..., deterministic), so one bad file never kills a worker.
        extensions: file endings accepted, case-insensitive (with or without the dot).
        labels: ``"auto"``: when every image sits in a first-level sub-folder, the sorted sub-folder
            names are ``classes`` and the index of an image's sub-folder is its label (as
            torchvision's ImageFolder); otherwise unlabelled. ``"none"``: always unlabelled (-1).
        mode: None (keep L or RGB), ``"RGB"`` or ``"L"``.
        max_pixels: images with more pixels are refused as decompression bombs (by their header).

    Attributes: ``paths`` (list of Path), ``classes`` (list, may be empty), ``targets`` (list of
    int), ``skipped`` (list of str paths found unreadable in this process).
    """

    def __init__(self, root: str | Path, transform: Transform | None = None, *,
                 strict: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 labels: str = "auto", mode: str | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.root = Path(root)
        self.max_pixels = max_pixels
        if not self.root.exists():
            raise FileNotFoundError(f"data directory {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"data directory {str(self.root)!r} is not a directory")
        if labels not in ("auto", "none"):
            raise ValueError(f"labels must be 'auto' or 'none', got {labels!r}")
        if mode not in (None, "RGB", "L"):
            raise ValueError(f"mode must be None, 'RGB' or 'L', got {mode!r}")
        if isinstance(extensions, str):
            raise TypeError(f"extensions must be a sequence of endings, got {extensions!r}")
        self.extensions = tuple(sorted({("." + e.lower().lstrip(".")) for e in extensions}))
        self.paths: list[Path] = _scan(self.root, self.extensions, strict)
        if not self.paths:
            raise FileNotFoundError(f"no images found under {str(self.root)!r} (searched "
                                    f"recursively for {list(self.extensions)}, any case)")
        self.transform, self.strict, self.mode = transform, strict, mode
        self.classes, self.targets = folder_labels(self.root, self.paths, labels)
        self._reset_flags()
        self._check_one_readable()

    def _reset_flags(self) -> None:
        # One flag per file in shared memory: DataLoader worker processes mark the files they
        # found unreadable here, so the main process can count them at the end of a run.
        self._bad = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    def _check_one_readable(self) -> None:
        """Fail now, with a count, when no file decodes (rather than in the first batch)."""
        errors = 0
        for i, path in enumerate(self.paths):
            try:
                read_image(path, self.mode, max_pixels=self.max_pixels)
                return
            except ImageReadError as e:
                if self.strict:
                    raise
                errors += 1
                self._mark_bad(i, path, e)
        raise ImageReadError(f"none of the {errors} image file(s) under {self.root} is readable "
                             "(each was named in a warning above)")

    @property
    def skipped(self) -> list[str]:
        """Paths found unreadable so far, in this process or in its loader workers."""
        return [str(self.paths[i]) for i in self._bad.nonzero().flatten().tolist()]

    def __len__(self) -> int:
        return len(self.paths)

    def _mark_bad(self, i: int, path: Path, err: Exception) -> None:
        if not bool(self._bad[i]):
            self._bad[i] = True
            warnings.warn(f"skipping unreadable image {path} ({err.__cause__ or err}); "
                          f"{int(self._bad.sum())} skipped so far", stacklevel=3)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for k in range(n):
            i = (index + k) % n
            path = self.paths[i]
            if bool(self._bad[i]):
                continue
            try:
                img = read_image(path, self.mode, max_pixels=self.max_pixels)
            except ImageReadError as e:
                if self.strict:
                    raise
                self._mark_bad(i, path, e)
                continue
            return (self.transform(img) if self.transform is not None else img), self.targets[i]
        raise ImageReadError(f"none of the {n} images under {self.root} is readable")

    def verify(self, progress: bool = False) -> list[str]:
        """Decode every file now and return the unreadable ones (paths as str). Unless ``strict``,
        they are also warned about, added to ``skipped`` and removed from ``paths``/``targets``."""
        paths: Any = self.paths
        if progress:
            try:
                from tqdm.auto import tqdm

                paths = tqdm(self.paths, desc="verifying images", unit="img")
            except ImportError:  # pragma: no cover - tqdm ships with lightning
                pass
        bad: list[str] = []
        for i, path in enumerate(paths):
            try:
                read_image(path, max_pixels=self.max_pixels)
            except ImageReadError as e:
                bad.append(str(path))
                if not self.strict:
                    self._mark_bad(i, path, e)
        if bad and not self.strict:
            gone = set(bad)
            keep = [i for i, p in enumerate(self.paths) if str(p) not in gone]
            self.removed = [*getattr(self, "removed", []), *bad]
            self.paths = [self.paths[i] for i in keep]
            self.targets = [self.targets[i] for i in keep]
            self._reset_flags()
        return bad

    def summary(self) -> str:
        """One line: counts of images, classes and skipped unreadable files."""
        classes = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        n_bad = len(self.skipped) + len(getattr(self, "removed", []))
        return (f"{len(self.paths)} images under {self.root} ({classes}); "
                f"{n_bad} unreadable file(s) skipped")

    def __repr__(self) -> str:
        return f"ImageFolderDataset({self.summary()})"


# ------------------------------------------------------------------------------- idx (MNIST) files
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), gzip-compressed or raw (detected by content).

    Header: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D
    float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian uint32.
    Returns an array of that shape in native byte order. Corrupt or truncated files raise
    ``ValueError`` naming the path.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"idx file {str(p)!r} does not exist")
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"idx file {p} is a corrupt gzip file: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{p} is not an idx file: bad magic number {raw[:4].hex() or '(empty)'} "
                         f"(expected 0000 + type byte in {[hex(t) for t in _IDX_DTYPES]} + ndim)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx file {p} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"idx file {p} holds {len(raw) - header} data bytes but its header "
                         f"{dims} needs {expected}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


class _GreyArrayDataset(Dataset):
    """uint8 images ``[N, H, W]`` with int labels, served as ``(transform(PIL 'L'), label)``."""

    classes: list[str]

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform | None):
        self.images, self.transform = images, transform
        self.targets: list[int] = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(np.ascontiguousarray(self.images[index]))  # 2-D uint8 -> mode L
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


def balanced_first(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Positions of the first ``limit`` items when items are taken round-robin over the classes
    in file order (rank 0 of every class, then rank 1, ...), sorted; all positions when None."""
    labels = np.asarray(labels)
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rank = np.zeros(len(labels), dtype=np.int64)  # how many earlier items share the class
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    order = np.argsort(rank, kind="stable")  # by rank, ties in file order
    return np.sort(order[:limit])


class FashionMNISTDataset(_GreyArrayDataset):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 28 x 28 grey images of 10
    clothing classes, read from the idx files that Debian's ``dataset-fashion-mnist`` installs.

    Items ``(transform(PIL 'L' image), label)``. ``limit=N`` keeps a deterministic, class-balanced
    subset: each class's images are taken in file order, round-robin over the classes (every
    class's k-th image before any (k+1)-th, ties by file position), so per-class counts differ by
    at most one; served in file order. (A plain prefix is only roughly balanced: the first 100
    train images hold 4 to 15 per class.) Subsets are nested: the one for N is part of the one
    for any larger N. ``indices`` are the kept positions in the file.
    """

    def __init__(self, root: str | Path = FASHION_MNIST_ROOT, split: str = "train",
                 transform: Transform | None = None, limit: int | None = None):
        split, limit = _check_split(split), _check_limit(limit)
        self.root = Path(root)
        files = [self.root / name for name in FASHION_MNIST_FILES[split]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"Fashion-MNIST files not found: {missing}; install them with "
                                    f"`{FASHION_MNIST_INSTALL}`")
        images, labels = load_idx(files[0]), load_idx(files[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST files under {self.root} disagree: images "
                             f"{images.shape}, labels {labels.shape}")
        self.indices = balanced_first(labels, limit)
        super().__init__(images[self.indices], labels[self.indices], transform)
        self.split = split
        self.classes = list(FASHION_MNIST_CLASSES)


def fashion_mnist_available(root: str | Path = FASHION_MNIST_ROOT) -> bool:
    """Whether all four Fashion-MNIST idx files are under ``root``."""
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    return all((Path(root) / name).is_file() for name in names)


class DigitsDataset(_GreyArrayDataset):
    """scikit-learn's bundled digits (UCI optical digits: 1,797 8 x 8 images, 10 classes), pixel
    values 0..16 scaled to uint8 0..255 (``round(v * 255 / 16)``), served as PIL 'L' images.

    The split is deterministic and stratified: ``test_fraction`` of each class goes to "test"
    (sklearn's ``train_test_split`` with ``random_state=seed``). ``indices`` are the positions in
    ``load_digits()``; ``limit`` keeps the first N of the (shuffled) split.
    """

    def __init__(self, split: str = "train", transform: Transform | None = None,
                 test_fraction: float = 0.25, seed: int = 0, limit: int | None = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        split, limit = _check_split(split), _check_limit(limit)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        train, test = train_test_split(np.arange(len(images)), test_size=test_fraction,
                                       random_state=seed, stratify=digits.target)
        self.indices = (train if split == "train" else test)[:limit]
        super().__init__(images[self.indices], digits.target[self.indices], transform)
        self.split = split
        self.classes = [str(d) for d in range(10)]


def load_demo_dataset(name: str = "auto", split: str = "train", transform: Transform | None = None,
                      limit: int | None = None, root: str | Path | None = None) -> Dataset:
    """The demo data: ``"fashion-mnist"``, ``"digits"``, or ``"auto"`` = Fashion-MNIST when its
    files are under ``root`` (default: Debian's path), else digits with a warning saying how to
    install Fashion-MNIST. Asking for ``"fashion-mnist"`` when it is missing is an error."""
    root = Path(root) if root is not None else Path(FASHION_MNIST_ROOT)
    _check_split(split)
    if name == "auto":
        if fashion_mnist_available(root):
            name = "fashion-mnist"
        else:
            warnings.warn(f"Fashion-MNIST not found under {root}; using scikit-learn's 8x8 "
                          f"digits instead. For Fashion-MNIST run: `{FASHION_MNIST_INSTALL}`",
                          stacklevel=2)
            name = "digits"
    if name == "fashion-mnist":
        if not fashion_mnist_available(root):
            raise FileNotFoundError(f"Fashion-MNIST not found under {root}; install it with "
                                    f"`{FASHION_MNIST_INSTALL}`")
        return FashionMNISTDataset(root, split, transform, limit)
    if name == "digits":
        return DigitsDataset(split, transform, limit=limit)
    raise ValueError(f"name must be 'auto', 'fashion-mnist' or 'digits', got {name!r}")


# ------------------------------------------------------------------------------ in-memory and wraps
class TensorImageDataset(Dataset):
    """Images in one array ``[N, C, H, W]`` or ``[N, H, W]`` (numpy or torch; uint8 0..255 or
    float in [0, 1]); items ``(transform(image [C, H, W]) or the image, label or -1)``.

    ``[N, H, W]`` gets a channel axis (C = 1). ``images`` holds the tensor (numpy input is shared,
    not copied, when it is writable).
    """

    def __init__(self, images: Any, labels: Any = None, transform: Transform | None = None):
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images if images.flags.writeable else images.copy())
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a numpy array or a torch tensor, "
                            f"got {type(images).__name__}")
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W] or [N, H, W], "
                             f"got shape {tuple(images.shape)}")
        if images.shape[1] not in (1, 2, 3, 4):
            raise ValueError(f"images must be [N, C, H, W] with C in 1..4, got shape "
                             f"{tuple(images.shape)} (channels-last? permute(0, 3, 1, 2) it)")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 or float, got {images.dtype}")
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
            if len(labels) != len(images):
                raise ValueError(f"labels has {len(labels)} entries for {len(images)} images")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.images[index]
        label = -1 if self.labels is None else int(self.labels[index])
        return (self.transform(img) if self.transform is not None else img), label


class TransformDataset(Dataset):
    """Wraps a dataset whose items are an image or ``(image, label, ...)``; items become
    ``(transform(image), label)`` with label -1 when there is none (or it is None)."""

    def __init__(self, dataset: Dataset, transform: Transform):
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            if not item:
                raise ValueError(f"item {index} of the wrapped dataset is empty")
            image, label = item[0], _label(item[1]) if len(item) > 1 else -1
        else:
            image, label = item, -1
        return self.transform(image), label
