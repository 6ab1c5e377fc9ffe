"""Batched feature extraction from a frozen backbone (the teacher's by default)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

KINDS = ("cls", "avgpool", "cls+avgpool", "last_blocks", "last_blocks+avgpool")


def _backbone(model: Any) -> Any:
    return model.teacher_backbone if hasattr(model, "teacher_backbone") else model


def _features(backbone: Any, x: Tensor, kind: str, n_last_blocks: int) -> Tensor:
    if kind.startswith("last_blocks"):
        f = backbone.intermediate_cls(x, n_last_blocks)
        if kind == "last_blocks":
            return f
        out = backbone(x)
        return torch.cat([f, _avgpool(out, backbone)], dim=-1)
    out = backbone(x)
    if kind == "cls":
        return out.cls
    if kind == "avgpool":
        return _avgpool(out, backbone)
    return torch.cat([out.cls, _avgpool(out, backbone)], dim=-1)


def _avgpool(out: Any, backbone: Any) -> Tensor:
    if out.patches is None or out.patches.shape[1] == 0:
        raise TypeError(f"{type(backbone).__name__} gives no patch tokens: use kind='cls'")
    return out.patches.mean(dim=1)


@torch.inference_mode()
def extract_features(model: Any, loader: Iterable[Any], *, kind: str = "cls", n_last_blocks: int = 4,
                     device: str | torch.device | None = None,
                     progress: bool = True) -> tuple[Tensor, Tensor | None]:
    """Features ``[N, D]`` (float32, CPU) and labels ``[N]`` (None when unlabelled).

    Args:
        model: a :class:`~dinokit.backbones.Backbone` or a method (its ``teacher_backbone`` is used).
        loader: batches of images, or ``(images, labels, ...)``; label -1 means unlabelled.
        kind: ``cls`` | ``avgpool`` (mean patch token) | ``cls+avgpool`` | ``last_blocks`` (CLS of
            the last ``n_last_blocks`` blocks, DINO's linear-eval input) | ``last_blocks+avgpool``.
    """
    from tqdm.auto import tqdm

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    backbone = _backbone(model)
    device = torch.device(device) if device else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for batch in tqdm(loader, desc="features", disable=not progress, leave=False):
            if isinstance(batch, (list, tuple)):
                x, y = batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                x, y = batch, None
            feats.append(_features(backbone, x.to(device), kind, n_last_blocks).float().cpu())
            labels.append(torch.as_tensor(y).long() if y is not None
                          else torch.full((len(x),), -1, dtype=torch.long))
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("the loader gave no images")
    y_all = torch.cat(labels)
    return torch.cat(feats), (None if bool((y_all < 0).all()) else y_all)
