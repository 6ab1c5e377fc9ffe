"""Weighted k-NN classification on frozen features (Wu et al. 2018, as used by DINO, Caron et al.
2021): L2-normalised features, cosine similarity, the top-k neighbours vote with weight
``exp(sim / T)`` (T = 0.07). All ``ks`` come from one top-k pass; similarities are computed in
chunks of test rows so memory stays bounded (train features may stay on the CPU)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(train_features: Tensor, train_labels: Tensor | None, test_features: Tensor) -> None:
    if train_labels is None or bool((torch.as_tensor(train_labels) < 0).all()):
        raise ValueError("k-NN needs labelled data: the training set has no labels")
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"features must be [N, D]; got {tuple(train_features.shape)} and "
                         f"{tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have D={train_features.shape[1]} but test features "
                         f"D={test_features.shape[1]}")
    if len(train_labels) != len(train_features):
        raise ValueError(f"{len(train_labels)} train labels for {len(train_features)} train features")


@torch.no_grad()
def knn_classify(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024,
                 device: str | torch.device | None = None) -> dict[int, Tensor]:
    """Class scores ``[M, C]`` for each ``k`` (on the CPU)."""
    _check(train_features, train_labels, test_features)
    device = torch.device(device) if device else test_features.device
    train = F.normalize(train_features.float(), dim=1)
    labels = torch.as_tensor(train_labels).long()
    c = int(num_classes or int(labels.max()) + 1)
    k_max = min(max(ks), len(train))
    scores = {k: [] for k in ks}
    for start in range(0, len(test_features), chunk_size):
        q = F.normalize(test_features[start : start + chunk_size].float().to(device), dim=1)
        sim = q @ train.to(device).T
        top_sim, top_idx = sim.topk(k_max, dim=1)  # sorted, so the first k columns are the k-NN
        weights = (top_sim / temperature).exp()
        onehot = F.one_hot(labels.to(device)[top_idx], c).float()  # [m, k_max, C]
        for k in ks:
            kk = min(k, k_max)
            scores[k].append((onehot[:, :kk] * weights[:, :kk, None]).sum(1).cpu())
    return {k: torch.cat(v) for k, v in scores.items()}


def knn_evaluate(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, **kwargs) -> dict[int, dict[str, float | None]]:
    """Top-1 and top-5 accuracy (%) per k; top-5 is None with fewer than 5 classes."""
    if test_labels is None:
        raise ValueError("k-NN evaluation needs labelled test data")
    scores = knn_classify(train_features, train_labels, test_features, **kwargs)
    y = torch.as_tensor(test_labels).long()
    out: dict[int, dict[str, float | None]] = {}
    for k, s in scores.items():
        top1 = (s.argmax(1) == y).float().mean().item() * 100
        top5 = None
        if s.shape[1] >= 5:
            top5 = (s.topk(5, dim=1).indices == y[:, None]).any(1).float().mean().item() * 100
        out[k] = {"top1": top1, "top5": top5}
    return out
