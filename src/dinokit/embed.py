"""Features of a folder of images (or a preset dataset) from a run or an exported backbone.

``embed(source, data)`` returns one row per readable image: the CLS embedding (``pool="cls"``)
or the mean of the patch tokens (``pool="mean"``), computed in batches on the GPU when there is
one, with the preprocessing the backbone was trained or exported with. Unreadable images are
skipped and listed, as in training. ``save_embeddings`` writes ``.npy`` + ``.csv`` (file names)
and ``.parquet`` when pyarrow is installed; ``dinokit embed`` is the same call.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dinokit.atomic import atomic_paths
from dinokit.backbones import Backbone
from dinokit.data import ImageReadError, load_demo_dataset, read_image
from dinokit.data.multiband import MultiBandFolderDataset, folder_dataset, load_image
from dinokit.export import _model_preprocessing, _resolve, eval_transform, load_backbone

PRESET_DATASETS = ("demo", "digits", "fashion-mnist")


@dataclass
class Embeddings:
    """Features ``[N, D]`` (float32), the image names, their labels (-1 when unlabelled) and the
    files skipped as unreadable."""

    features: np.ndarray
    names: list[str]
    labels: list[int]
    skipped: list[str] = field(default_factory=list)


class _Images(Dataset):
    """Images by path; an unreadable file gives ``ok=False`` instead of an error."""

    def __init__(self, paths: list[Path], labels: list[int], transform: Any, read: Any = None):
        self.paths, self.labels, self.transform = paths, labels, transform
        self.read = read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        try:
            x = self.transform((self.read or read_image)(self.paths[i]))
        except (ImageReadError, OSError, ValueError):
            return torch.zeros(()), i, False
        return x, i, True


class _Indexed(Dataset):
    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        return self.ds[i][0], i, True


def _collate(batch: list[tuple[torch.Tensor, int, bool]]) -> tuple[torch.Tensor | None, list[int], list[int]]:
    good = [b for b in batch if b[2]]
    bad = [b[1] for b in batch if not b[2]]
    x = torch.stack([b[0] for b in good]) if good else None
    return x, [b[1] for b in good], bad


def load_for_embedding(source: str | Path | Backbone, which: str = "teacher") -> tuple[Backbone, Any]:
    """A backbone and its eval transform from a run directory, a training checkpoint, an export
    (folder or ``.safetensors``) or a :class:`Backbone` (with ``preprocessing`` set, or ImageNet's)."""
    if isinstance(source, Backbone):
        pre = source.preprocessing or _model_preprocessing(source)
        return source, eval_transform(pre)
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(source)!r} does not exist")
    is_export = p.suffix in (".safetensors", ".json") or (p.is_dir() and (p / "config.json").is_file())
    if is_export:
        bb = load_backbone(p)
    else:
        e = _resolve(p, which, timm_name=None, timm_kwargs=None, preprocessing=None)
        bb = e.backbone
        bb.preprocessing = e.preprocessing
    return bb.eval(), eval_transform(bb.preprocessing or _model_preprocessing(bb))


def _dataset(data: str | Path, transform: Any, split: str,
             limit: int | None) -> tuple[Dataset, list[str], list[int]]:
    if str(data) in PRESET_DATASETS:
        name = "auto" if str(data) == "demo" else str(data)
        ds = load_demo_dataset(name, split=split, transform=transform, limit=limit)
        n = len(ds)
        labels = [int(ds[i][1]) for i in range(n)] if n and isinstance(ds[0][1], int) else [-1] * n
        return _Indexed(ds), [f"{data}/{split}/{i}" for i in range(n)], labels
    folder: Any = folder_dataset(data, channels=getattr(transform, "channels", 3))
    read = load_image if isinstance(folder, MultiBandFolderDataset) else None
    paths, labels = folder.paths, folder.targets
    if limit:
        paths, labels = paths[:limit], labels[:limit]
    names = [str(q.relative_to(folder.root)) for q in paths]
    return _Images(list(paths), list(labels), transform, read), names, list(labels)


@torch.no_grad()
def embed(source: str | Path | Backbone, data: str | Path, *, pool: str = "cls", batch_size: int = 64,
          which: str = "teacher", device: str | None = None, split: str = "train",
          limit: int | None = None, num_workers: int = 0, progress: bool = True) -> Embeddings:
    """Embed every image of ``data`` (a folder, recursive, or ``demo``/``digits``/``fashion-mnist``);
    ``source`` may also be an exported ``.onnx`` file, run with onnxruntime on the CPU."""
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(source, (str, Path)) and Path(source).suffix == ".onnx":  # onnxruntime, no torch model
        from dinokit.interop.onnx import OnnxFeatures  # the optional onnx extra

        dev, runner = torch.device("cpu"), OnnxFeatures(source)
        transform = runner.transform

        def featurize(x: torch.Tensor) -> torch.Tensor:
            out = runner.features(x.numpy())
            return torch.from_numpy(out["cls"] if pool == "cls" else out["patches"].mean(axis=1))
    else:
        backbone, transform = load_for_embedding(source, which)
        backbone = backbone.to(dev).eval()
        if pool == "mean" and not backbone.has_patch_tokens:
            raise ValueError(f"pool='mean' needs patch features; {type(backbone).__name__} gives only a "
                             "pooled vector: use pool='cls'")

        def featurize(x: torch.Tensor) -> torch.Tensor:
            out = backbone(x.to(dev, non_blocking=True))
            return out.cls if pool == "cls" else out.patches.mean(dim=1)
    ds, names, labels = _dataset(data, transform, split, limit)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=dev.type == "cuda")
    it: Any = loader
    if progress:
        it = tqdm(loader, desc="embedding", unit="batch")
    feats: list[torch.Tensor] = []
    kept: list[int] = []
    bad: list[int] = []
    for x, idx, skipped in it:
        bad.extend(skipped)
        if x is None:
            continue
        feats.append(featurize(x).float())
        kept.extend(idx)
    if not kept:
        raise ValueError(f"none of the {len(names)} images under {data} could be read")
    features = torch.cat(feats).cpu().numpy()
    return Embeddings(features, [names[i] for i in kept], [labels[i] for i in kept], [names[i] for i in bad])


def save_embeddings(emb: Embeddings, output: str | Path) -> list[Path]:
    """Write ``<output>.npy`` (features), ``<output>.csv`` (row, name, label) and, with pyarrow,
    ``<output>.parquet`` (name, label, feature); returns the paths written.

    The files are written under temporary names and renamed together once all are complete
    (:mod:`dinokit.atomic`): a full disk or a kill leaves the earlier files of that name intact.
    """
    base = Path(output)
    base = base.with_suffix("") if base.suffix in (".npy", ".csv", ".parquet") else base
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = pq = None
    written = [base.with_suffix(".npy"), base.with_suffix(".csv")]
    if pq is not None:
        written.append(base.with_suffix(".parquet"))
    with atomic_paths(written) as tmps:
        with open(tmps[0], "xb") as f:
            np.save(f, emb.features)
        with open(tmps[1], "x", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "name", "label"])
            w.writerows((i, n, lab) for i, (n, lab) in enumerate(zip(emb.names, emb.labels)))
        if pq is not None:
            table = pa.table({"name": emb.names, "label": emb.labels, "feature": list(emb.features)})
            pq.write_table(table, str(tmps[2]))
    return written
