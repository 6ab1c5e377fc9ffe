"""Multi-band images: GeoTIFF/TIFF files (read with ``tifffile``, the ``geo`` extra) and ``.npy``
arrays with any number of bands, as found in multispectral satellite imagery (Sentinel-2: 13 bands)
and multi-channel microscopy.

A file holds one image ``[C, H, W]``: ``.npy`` as ``[C, H, W]`` (or ``[H, W]``); a TIFF as its
first series, whose axes say which one holds the bands (``SYX`` planar, ``YXS`` interleaved, or one
page per band, ``QYX``/``CYX``/...). Samples are uint8 (scaled by 1/255), uint16 (1/65535) or
float32 (kept as they are), so that the pixels the network sees are float32 and the per-band
mean/std of the run (:func:`band_statistics`, ``dinokit data stats``) normalise them.

A file ``<name>.mask.tif`` / ``<name>.mask.npy`` beside an image marks its valid pixels (non-zero;
e.g. outside a satellite swath, a no-data value): the statistics count only valid pixels, and the
dataset fills the invalid ones with the image's own per-band mean over its valid pixels. A mask of
another size than its image is an error naming both.

Every file of a folder must have the same number of bands (checked from the file headers when the
dataset is built); the error names the first file that differs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from dinokit.data.datasets import ImageFolderDataset, ImageReadError, Transform, _scan, folder_labels

BAND_EXTENSIONS = (".tif", ".tiff", ".npy")
MASK_MARK = ".mask"
#: sample types read, with the factor that maps them to the float pixels the network sees.
DTYPE_SCALE = {np.dtype(np.uint8): 1 / 255, np.dtype(np.uint16): 1 / 65535, np.dtype(np.float32): 1.0}
SPATIAL_AXES = ("Y", "X")


class BandFileError(ImageReadError):
    """A multi-band file that cannot be used (unreadable, unsupported sample type, band count or mask
    size that does not fit); the message names the file."""


def _tifffile() -> Any:
    from dinokit.interop.extras import require

    return require("tifffile", "geo", "reading TIFF bands")


def is_mask(path: Path) -> bool:
    """Whether ``path`` is a validity mask (``<name>.mask.tif`` / ``.mask.npy``)."""
    return Path(path.stem).suffix.lower() == MASK_MARK


def mask_path(path: Path) -> Path | None:
    """The mask file beside ``path`` (same extension first), or None."""
    path = Path(path)
    for ext in dict.fromkeys((path.suffix, *BAND_EXTENSIONS)):
        candidate = path.with_name(f"{path.stem}{MASK_MARK}{ext}")
        if candidate.is_file():
            return candidate
    return None


def _tiff_layout(axes: str, shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    """(band axis or -1 for a single band, number of bands) of a TIFF series."""
    squeezed = [(a, n) for a, n in zip(axes, shape) if n != 1 or a in SPATIAL_AXES]
    others = [i for i, (a, _) in enumerate(squeezed) if a not in SPATIAL_AXES]
    if [a for a, _ in squeezed if a in SPATIAL_AXES] != list(SPATIAL_AXES) or len(others) > 1:
        raise BandFileError(f"{path}: TIFF axes {axes!r} of shape {shape} are not one image of bands "
                            "(expected YX plus at most one band axis)")
    return (others[0], squeezed[others[0]][1]) if others else (-1, 1)


def band_shape(path: str | Path) -> tuple[int, int, int]:
    """``(C, H, W)`` of a band file, from its header only."""
    p = Path(path)
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            shape = arr.shape
            dtype = arr.dtype
            if len(shape) == 2:
                shape = (1, *shape)
        else:
            with _tifffile().TiffFile(p) as tif:
                series = tif.series[0]
                _, bands = _tiff_layout(series.axes, series.shape, p)
                dims = [n for a, n in zip(series.axes, series.shape) if a in SPATIAL_AXES]
                shape, dtype = (bands, *dims), np.dtype(series.dtype)
    except BandFileError:
        raise
    except Exception as e:  # numpy and tifffile raise ValueError, OSError, struct errors...
        raise BandFileError(f"cannot read band file {p}: {type(e).__name__}: {e}") from e
    if len(shape) != 3:
        raise BandFileError(f"{p}: an array of shape {tuple(shape)}; expected [C, H, W] or [H, W]")
    if dtype not in DTYPE_SCALE:
        raise BandFileError(f"{p}: samples of type {dtype}; supported: uint8, uint16, float32")
    return int(shape[0]), int(shape[1]), int(shape[2])


def read_bands(path: str | Path) -> np.ndarray:
    """The image of a band file as ``[C, H, W]`` in its own sample type (uint8, uint16, float32)."""
    p = Path(path)
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False)
            arr = arr[None] if arr.ndim == 2 else arr
        else:
            with _tifffile().TiffFile(p) as tif:
                series = tif.series[0]
                axis, _ = _tiff_layout(series.axes, series.shape, p)
                keep = [i for i, (a, n) in enumerate(zip(series.axes, series.shape))
                        if n != 1 or a in SPATIAL_AXES]
                arr = series.asarray().reshape([series.shape[i] for i in keep])
                arr = np.moveaxis(arr, axis, 0) if axis >= 0 else arr[None]
    except BandFileError:
        raise
    except Exception as e:
        raise BandFileError(f"cannot read band file {p}: {type(e).__name__}: {e}") from e
    if arr.ndim != 3:
        raise BandFileError(f"{p}: an array of shape {tuple(arr.shape)}; expected [C, H, W] or [H, W]")
    if arr.dtype not in DTYPE_SCALE:
        raise BandFileError(f"{p}: samples of type {arr.dtype}; supported: uint8, uint16, float32")
    return np.ascontiguousarray(arr)


def to_float(arr: np.ndarray) -> np.ndarray:
    """Samples as the float32 pixels the network sees (uint8 / 255, uint16 / 65535, float32 kept)."""
    return arr.astype(np.float32) * np.float32(DTYPE_SCALE[arr.dtype])


def read_valid(path: str | Path, hw: tuple[int, int]) -> np.ndarray | None:
    """The validity mask ``[H, W]`` (bool) beside ``path``, or None; a mask of another size than the
    image (``hw``) is a :class:`BandFileError` naming both files."""
    mp = mask_path(Path(path))
    if mp is None:
        return None
    m = read_bands(mp)
    if m.shape[0] != 1 or tuple(m.shape[1:]) != tuple(hw):
        raise BandFileError(f"mask {mp} is {m.shape[0]} x {m.shape[1]} x {m.shape[2]} (bands x H x W) but "
                            f"its image {path} is {hw[0]} x {hw[1]}: a mask needs one band of the image's "
                            "size")
    return m[0] != 0


def load_image(path: str | Path) -> torch.Tensor:
    """One file as float32 ``[C, H, W]`` (see :func:`to_float`), invalid pixels (its mask) filled with
    the image's per-band mean over its valid pixels."""
    arr = read_bands(path)
    x = to_float(arr)
    valid = read_valid(path, arr.shape[1:])
    if valid is not None and not valid.all():
        fill = x[:, valid].mean(axis=1) if valid.any() else np.zeros(x.shape[0], np.float32)
        x = np.where(valid[None], x, fill[:, None, None]).astype(np.float32)
    return torch.from_numpy(x)


def scan_band_files(root: str | Path, strict: bool = False) -> list[Path]:
    """Sorted band files under ``root`` (recursive), masks left out."""
    return [p for p in _scan(Path(root), BAND_EXTENSIONS, strict) if not is_mask(p)]


def check_bands(paths: Sequence[Path], channels: int | None = None) -> int:
    """The band count every file shares (from the headers); raises :class:`BandFileError` naming
    the first file whose count differs from the first file's (or from ``channels``), or whose mask
    has another size."""
    expected, first = channels, None
    for p in paths:
        c, h, w = band_shape(p)
        if expected is None:
            expected, first = c, p
        elif c != expected:
            against = f"the first file {first} has {expected}" if first else f"data.channels is {expected}"
            raise BandFileError(f"{p} has {c} band(s) but {against}: every image needs the same bands")
        mp = mask_path(p)
        if mp is not None:
            mc, mh, mw = band_shape(mp)
            if (mc, mh, mw) != (1, h, w):
                raise BandFileError(f"mask {mp} is {mc} x {mh} x {mw} (bands x H x W) but its image {p} is "
                                    f"{h} x {w}: a mask needs one band of the image's size")
    if expected is None:
        raise BandFileError("no band files to check")
    return int(expected)


class MultiBandFolderDataset(Dataset):
    """Every band file under ``root`` (recursive, sorted; ``.tif``/``.tiff``/``.npy``, masks left
    out); items ``(transform(image float32 [C, H, W]), label)``.

    Labels as :class:`~dinokit.data.ImageFolderDataset`: first-level sub-folders are classes when
    every file sits in one (``labels="auto"``). ``channels``: the band count required (None = the
    first file's); every file's is checked from its header when the dataset is built.
    ``strict=False`` skips (and warns about) a file that fails to decode later, serving the next one.
    """

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None, *,
                 channels: int | None = None, labels: str = "auto", strict: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data directory {str(self.root)!r} does not exist or is not a directory")
        self.paths: list[Path] = scan_band_files(self.root, strict)
        if not self.paths:
            raise FileNotFoundError(f"no band files found under {str(self.root)!r} (searched recursively "
                                    f"for {list(BAND_EXTENSIONS)})")
        self.channels = check_bands(self.paths, channels)
        self.classes, self.targets = folder_labels(self.root, self.paths, labels)
        self.transform, self.strict = transform, strict
        self._bad = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    @property
    def skipped(self) -> list[str]:
        return [str(self.paths[i]) for i in self._bad.nonzero().flatten().tolist()]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.paths)
        for k in range(n):
            i = (index + k) % n
            if bool(self._bad[i]):
                continue
            try:
                x = load_image(self.paths[i])
            except BandFileError as e:
                if self.strict:
                    raise
                self._bad[i] = True
                warnings.warn(f"skipping unreadable band file {self.paths[i]} ({e})", stacklevel=2)
                continue
            return (self.transform(x) if self.transform is not None else x), self.targets[i]
        raise BandFileError(f"none of the {n} band files under {self.root} is readable")

    def summary(self) -> str:
        classes = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        return f"{len(self.paths)} images of {self.channels} bands under {self.root} ({classes})"


# ---------------------------------------------------------------------------------- statistics
@dataclass
class BandStatistics:
    """Per-band ``mean`` and ``std`` of the float pixels (see :func:`to_float`) over ``pixels``
    valid pixels of ``images`` files."""

    mean: list[float]
    std: list[float]
    pixels: int
    images: int

    def overrides(self) -> str:
        """The config overrides that record them: ``data.mean=[...] data.std=[...]``."""
        fmt = ", ".join
        return (f"data.mean=[{fmt(f'{v:.6g}' for v in self.mean)}] "
                f"data.std=[{fmt(f'{v:.6g}' for v in self.std)}]")


def band_statistics(root: str | Path, *, limit: int | None = None, channels: int | None = None,
                    progress: bool = False) -> BandStatistics:
    """Per-band mean and std of every valid pixel under ``root``, in one streaming pass (float64 sums
    of the pixels and of their squares, one file in memory at a time); ``channels``: the band count
    every file must have (default: the first file's).

    When ``torch.distributed`` is initialised each process reads every ``world_size``-th file and the
    sums are added across processes, so every process gets the statistics of the whole folder.
    """
    paths = scan_band_files(root)[:limit]
    if not paths:
        raise FileNotFoundError(f"no band files found under {str(root)!r} (searched recursively for "
                                f"{list(BAND_EXTENSIONS)})")
    channels = check_bands(paths, channels)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    sums = np.zeros((3, channels), np.float64)  # valid pixels, sum, sum of squares per band
    mine: Any = paths[rank::world]
    if progress:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc="band statistics", unit="file")
    for p in mine:
        arr = read_bands(p)
        x = arr.reshape(channels, -1).astype(np.float64) * DTYPE_SCALE[arr.dtype]
        valid = read_valid(p, arr.shape[1:])
        if valid is not None:
            x = x[:, valid.reshape(-1)]
        sums[0] += x.shape[1]
        sums[1] += x.sum(axis=1)
        sums[2] += np.square(x).sum(axis=1)
    if world > 1:
        total = torch.from_numpy(sums)
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
        sums = total.cpu().numpy()
    n = sums[0]
    if (n == 0).any():
        raise BandFileError(f"no valid pixels under {root} (every pixel masked out)")
    mean = sums[1] / n
    var = np.maximum(sums[2] / n - mean**2, 0.0)
    std = np.sqrt(var)
    std = np.where(std > 0, std, 1.0)  # a constant band: normalise by 1 rather than divide by 0
    return BandStatistics([float(v) for v in mean], [float(v) for v in std], int(n[0]), len(paths))


def folder_dataset(root: str | Path, transform: Transform | None = None, *, channels: int = 3,
                   strict: bool = False) -> Dataset:
    """The dataset of a folder for a backbone that reads ``channels`` channels: a
    :class:`MultiBandFolderDataset` (GeoTIFF/TIFF, ``.npy``) for any count
    other than 1 or 3, or when the folder holds ``.npy`` arrays; else an :class:`ImageFolderDataset`."""
    root = Path(root)
    if channels not in (1, 3) or (root.is_dir() and _scan(root, (".npy",))):
        return MultiBandFolderDataset(root, transform, channels=channels if channels not in (1, 3) else None,
                                      strict=strict)
    return ImageFolderDataset(root, transform=transform, strict=strict)
