"""Data: DINO's multi-crop transform, datasets (image folders, arrays, the demo data) and the
multi-crop collate (with iBOT masks)."""

from __future__ import annotations

from dinokit.data.collate import MultiCropCollate
from dinokit.data.datasets import (
    DigitsDataset,
    FashionMNISTDataset,
    ImageFolderDataset,
    ImageReadError,
    TensorImageDataset,
    TransformDataset,
    fashion_mnist_available,
    load_demo_dataset,
    load_idx,
    read_image,
)
from dinokit.data.multicrop import (
    EvalTransform,
    MultiCropConfig,
    MultiCropTransform,
    to_image_tensor,
    to_l_or_rgb,
)

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
    "fashion_mnist_available",
    "load_demo_dataset",
    "load_idx",
    "read_image",
    "to_image_tensor",
    "to_l_or_rgb",
]
