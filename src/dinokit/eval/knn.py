"""Weighted k-NN classification on frozen features (Wu et al. 2018, as used by DINO, Caron et al.
2021): L2-normalised features, cosine similarity, the top-k neighbours vote with weight
``exp(sim / T)`` (T = 0.07). All ``ks`` come from one top-k pass; similarities are computed in
chunks of test rows so memory stays bounded. The bank (train features and labels) is normalised and
moved to the voting device once (a GPU when there is one), not once per chunk; votes are summed
with ``scatter_add`` (memory ``chunk x classes``, not ``chunk x k x classes``).

Across processes (:func:`knn_correct` + a sum): each process votes for its share of the queries
against the whole bank, and the correct counts are summed, so every query is voted once."""

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


def _vote_device(train_features: Tensor, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if train_features.device.type != "cpu":
        return train_features.device
    return torch.device("cuda") if torch.cuda.is_available() else train_features.device


@torch.no_grad()
def knn_classify(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024,
                 device: str | torch.device | None = None, bank_dtype: torch.dtype | None = None,
                 out_device: str | torch.device | None = "cpu") -> dict[int, Tensor]:
    """Class scores ``[M, C]`` for each ``k`` (on ``out_device``; None = the voting device).

    ``device``: where the votes run (default: the bank's device, else a GPU when available, else
    the CPU). ``bank_dtype``: e.g. ``torch.float16`` halves the bank's memory on a GPU
    (similarities are then computed in that dtype; the votes in float32).
    """
    _check(train_features, train_labels, test_features)
    device = _vote_device(train_features, device)
    train = F.normalize(train_features.to(device).float(), dim=1)  # once, on the device
    if bank_dtype is not None:
        train = train.to(bank_dtype)
    labels = torch.as_tensor(train_labels).long().to(device)
    c = int(num_classes or int(labels.max()) + 1)
    k_max = min(max(ks), len(train))
    scores: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test_features), chunk_size):
        q = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        sim = q.to(train.dtype) @ train.T
        top_sim, top_idx = sim.float().topk(k_max, dim=1)  # sorted: the first k columns are the k-NN
        weights = (top_sim / temperature).exp()
        top_labels = labels[top_idx]  # [m, k_max]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(len(q), c, device=device)
            votes.scatter_add_(1, top_labels[:, :kk], weights[:, :kk])
            scores[k].append(votes.to(out_device) if out_device is not None else votes)
    return {k: torch.cat(v) for k, v in scores.items()}


def knn_correct(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                **kwargs) -> dict[int, Tensor]:
    """``[top-1 correct, top-5 correct (-1 with < 5 classes), count]`` per k, as float tensors on the
    voting device: summed over processes (each with its share of the queries) they give the
    accuracy of the whole query set."""
    kwargs.setdefault("out_device", None)
    scores = knn_classify(train_features, train_labels, test_features, **kwargs)
    out = {}
    for k, s in scores.items():
        y = torch.as_tensor(test_labels).long().to(s.device)
        top1 = (s.argmax(1) == y).sum()
        top5 = ((s.topk(5, dim=1).indices == y[:, None]).any(1).sum() if s.shape[1] >= 5
                else torch.tensor(-1, device=s.device))
        out[k] = torch.stack([top1, top5, torch.tensor(len(y), device=s.device)]).float()
    return out


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
