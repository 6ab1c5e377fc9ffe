"""Linear probe on frozen, cached features (DINO's linear evaluation, Caron et al. 2021, Sec. 4.1):
a linear layer trained with SGD (momentum 0.9) and a cosine learning rate, over a small
learning-rate sweep; or scikit-learn's logistic regression for small data.

The default sweep :data:`DEFAULT_LRS` spans 1e-3 to 10 (on standardised features the best SGD rate
often sits at or above 1, so a sweep ending at 1.0 reported its edge); a best value at either end
of a sweep is flagged (``LinearProbeResult.at_edge``) with a warning to widen it."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

#: The default sweep: half-decades from 1e-3 to 10.
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class LinearProbeResult:
    """Best validation accuracy (%) over the sweep, and every setting's result."""

    best_lr: float
    top1: float
    top5: float | None
    per_lr: dict[float, dict[str, float | None]] = field(default_factory=dict)
    classifier: nn.Module | None = None
    #: the best value is the smallest or largest of a sweep of several: widen the sweep
    at_edge: bool = False


def _accuracy(logits: Tensor, y: Tensor) -> tuple[float, float | None]:
    top1 = (logits.argmax(1) == y).float().mean().item() * 100
    top5 = None
    if logits.shape[1] >= 5:
        top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item() * 100
    return top1, top5


def _check(train_f: Tensor, train_y: Tensor | None, val_f: Tensor, val_y: Tensor | None) -> None:
    if train_y is None or val_y is None or bool((train_y < 0).all()):
        raise ValueError("the linear probe needs labelled train and validation data")
    if train_f.shape[1] != val_f.shape[1]:
        raise ValueError(f"train features have D={train_f.shape[1]} but validation features "
                         f"D={val_f.shape[1]}")


def linear_probe(train_features: Tensor, train_labels: Tensor, val_features: Tensor, val_labels: Tensor, *,
                 mode: str = "sgd", lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 100,
                 batch_size: int = 256, weight_decay: float = 0.0, momentum: float = 0.9, seed: int = 0,
                 device: str | torch.device | None = None, progress: bool = True) -> LinearProbeResult:
    """Train a linear classifier on frozen features; report the best of the sweep on validation.

    Features are standardised with the training set's mean and std (a fixed, BN-free affine map,
    so the probe stays linear). ``mode="logistic"`` sweeps scikit-learn's ``C`` over ``lrs``.
    """
    _check(train_features, train_labels, val_features, val_labels)
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ValueError(f"lrs must be a non-empty list of positive values, got {list(lrs)}")
    result = _probe(train_features, train_labels, val_features, val_labels, mode=mode, lrs=lrs,
                    epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, momentum=momentum,
                    seed=seed, device=device, progress=progress)
    if len(set(lrs)) > 1 and result.best_lr in (min(lrs), max(lrs)):
        result.at_edge = True
        name = "C" if mode == "logistic" else "lr"
        warnings.warn(f"linear probe: the best {name}={result.best_lr:g} is at the edge of the sweep "
                      f"{sorted(set(lrs))}; widen it", stacklevel=2)
    return result


def _probe(train_features: Tensor, train_labels: Tensor, val_features: Tensor, val_labels: Tensor, *,
           mode: str, lrs: Sequence[float], epochs: int, batch_size: int, weight_decay: float,
           momentum: float, seed: int, device: str | torch.device | None,
           progress: bool) -> LinearProbeResult:
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    xtr, xva = (train_features - mean) / std, (val_features - mean) / std
    ytr, yva = train_labels.long(), val_labels.long()
    n_classes = int(max(ytr.max(), yva.max())) + 1
    if mode == "logistic":
        return _logistic(xtr, ytr, xva, yva, lrs, n_classes)
    if mode != "sgd":
        raise ValueError(f"mode must be 'sgd' or 'logistic', got {mode!r}")
    device = torch.device(device or "cpu")
    xtr, ytr, xva, yva = xtr.to(device), ytr.to(device), xva.to(device), yva.to(device)
    per_lr: dict[float, dict[str, float | None]] = {}
    best: tuple[float, float, float | None, nn.Module] | None = None
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    for lr in lrs:
        g = torch.Generator(device="cpu").manual_seed(seed)
        clf = nn.Linear(xtr.shape[1], n_classes).to(device)
        with torch.no_grad():
            clf.weight.normal_(0, 0.01, generator=g)
            clf.bias.zero_()
        opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
        for _ in tqdm(range(epochs), desc=f"linear lr={lr}", disable=not progress, leave=False):
            order = torch.randperm(len(xtr), generator=g).to(device)
            for i in range(0, len(xtr), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(clf(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            top1, top5 = _accuracy(clf(xva), yva)
        per_lr[lr] = {"top1": top1, "top5": top5}
        if best is None or top1 > best[1]:
            best = (lr, top1, top5, clf.cpu())
    assert best is not None
    return LinearProbeResult(best[0], best[1], best[2], per_lr, best[3])


def _logistic(xtr, ytr, xva, yva, cs, n_classes) -> LinearProbeResult:
    # scikit-learn takes about a second to import; only this non-default mode needs it
    from sklearn.linear_model import LogisticRegression

    per: dict[float, dict[str, float | None]] = {}
    best = None
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=1000).fit(xtr.numpy(), ytr.numpy())
        proba = torch.zeros(len(xva), n_classes)
        proba[:, torch.as_tensor(clf.classes_)] = torch.as_tensor(clf.predict_proba(xva.numpy())).float()
        top1, top5 = _accuracy(proba, yva)
        per[c] = {"top1": top1, "top5": top5}
        if best is None or top1 > best[1]:
            best = (c, top1, top5)
    return LinearProbeResult(best[0], best[1], best[2], per, None)
