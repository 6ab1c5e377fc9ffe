"""Shared by ``dinokit eval|viz|export``: load a backbone from a checkpoint, build eval data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dinokit.backbones import Backbone
from dinokit.config import ConfigError, from_dict
from dinokit.data import EvalTransform, ImageFolderDataset, MultiCropConfig, load_demo_dataset
from dinokit.weights import WeightsError

DEMO_NAMES = ("demo", "fashion-mnist", "digits")


@dataclass
class Loaded:
    """A backbone ready for evaluation, its eval transform, and the run directory (if any)."""

    backbone: Backbone
    transform: EvalTransform
    run_dir: Path | None


def add_checkpoint_arg(p: Any) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="run directory, training .ckpt, or exported .safetensors")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="which backbone of a training checkpoint (default: teacher)")


def load(checkpoint: str, which: str = "teacher") -> Loaded:
    """Backbone + eval transform from a run directory, a training checkpoint or an export."""
    src = Path(checkpoint)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    if src.suffix in (".safetensors", ".json"):
        from dinokit.export import load_backbone, read_metadata

        meta = read_metadata(src)
        bb = load_backbone(src)
        size = int(meta.get("image_size") or 224)
        chans = int(meta["timm_kwargs"].get("in_chans", 3))
        mc = MultiCropConfig.small(size, channels=chans) if size <= 64 else MultiCropConfig(channels=chans)
        return Loaded(bb, EvalTransform.for_config(mc), None)
    from dinokit.train.build import build_method, build_multicrop_config
    from dinokit.weights import backbone_state_dict, load_backbone_weights, read_file

    ckpt = src / "checkpoints" / "last.ckpt" if src.is_dir() else src
    obj = read_file(ckpt)
    config = (obj.get("dinokit") or {}).get("config")
    if not config:
        raise WeightsError(f"{ckpt} is not a dinokit training checkpoint (no run config inside)")
    cfg = from_dict(config)
    torch.manual_seed(0)
    method = build_method(cfg)
    backbone = getattr(method, f"{which}_backbone")
    load_backbone_weights(backbone, backbone_state_dict(obj, which), source=str(ckpt))
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return Loaded(backbone.eval(), EvalTransform.for_config(build_multicrop_config(cfg)), run_dir)


def dataset(spec: str, transform: Any, *, split: str, limit: int | None = None,
            need_labels: bool = False) -> Dataset:
    """``demo``/``fashion-mnist``/``digits`` (train or test split) or an image folder."""
    if spec in DEMO_NAMES:
        return load_demo_dataset("auto" if spec == "demo" else spec, split=split, transform=transform,
                                 limit=limit)
    ds = ImageFolderDataset(spec, transform=transform)
    if need_labels and not ds.classes:
        raise ConfigError(f"k-NN and linear evaluation need labelled data: {spec} has no class sub-folders")
    if limit:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    return ds


def loader(ds: Dataset, batch_size: int = 256) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
