"""Data: multi-crop transforms, datasets (folders, arrays, demo data) and the collate."""

from dinokit.data.collate import MultiCropCollate
from dinokit.data.datasets import (
    DigitsDataset,
    FashionMNISTDataset,
    ImageFolderDataset,
    ImageReadError,
    TensorImageDataset,
    TransformDataset,
    load_demo_dataset,
    load_idx,
)
from dinokit.data.multicrop import EvalTransform, MultiCropConfig, MultiCropTransform

__all__ = [
    "DigitsDataset",
    "EvalTransform",
    "FashionMNISTDataset",
    "ImageFolderDataset",
    "ImageReadError",
    "MultiCropCollate",
    "MultiCropConfig",
    "MultiCropTransform",
    "TensorImageDataset",
    "TransformDataset",
    "load_demo_dataset",
    "load_idx",
]
