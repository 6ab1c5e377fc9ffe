"""Linear segmentation probe on frozen patch features (DINOv2, Oquab et al. 2024, Sec. 7.4;
DINOv3, Siméoni et al. 2025, Sec. 6.1.1: the "linear" head).

The backbone stays frozen; its patch tokens (of the last block, or of the last ``n`` blocks
concatenated, each through the backbone's final norm) form a feature map ``[D, h, w]`` per image.
The head is batch norm and a 1x1 convolution (dropout 0.1 before them in training, as the official
``LinearHead``); its logits ``[C, h, w]`` are upsampled bilinearly to the mask's resolution, where
the cross-entropy is taken (pixels of the ignore index left out) and where predictions are scored.
It trains with AdamW (weight decay 1e-3, linear warm-up then cosine, the official
``config-ade20k-linear-training.yaml`` optimiser) on features computed once. The official run
takes lr 1e-3 for 40,000 iterations; a probe of a few epochs on a small folder takes a small
fraction of that and is under-trained at 1e-3, so several learning rates may be given: each is
trained on four fifths of the training images and scored (mIoU) on the last fifth, and the best
is retrained on all of them (the classification probe's rule, DINO's and DINOv2's grid of linear
heads). ``lrs=(1e-3,)`` with enough epochs is the official protocol.

Scores, in %: mIoU (the mean over classes that occur in the ground truth or the predictions of
``TP / (TP + FP + FN)``, as mmsegmentation's ``nanmean``), pixel accuracy (``sum TP / pixels``)
and each class's IoU and accuracy (``TP / (TP + FN)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import InterpolationMode, v2
from tqdm.auto import tqdm

from dinokit.data.multicrop import to_image_tensor
from dinokit.data.preprocessing import Preprocessing
from dinokit.distributed import rank_world
from dinokit.eval.features import _backbone, gather_shards, shard_indices

#: The official linear head's training (config-ade20k-linear-training.yaml).
DEFAULT_LR = 1e-3
DEFAULT_WEIGHT_DECAY = 1e-3
#: Learning rates a short probe picks from on a held-out fifth of its training images.
PROBE_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


class LinearSegmentationHead(nn.Module):
    """Batch norm and a 1x1 convolution over a feature map: ``[B, D, h, w] -> [B, C, h, w]``.

    The convolution starts at ``N(0, 0.01)`` weights and zero bias; ``dropout`` (2-D, channel-wise)
    acts in training only.
    """

    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.bn = nn.BatchNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, n_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Logits ``[B, C, h, w]``, or upsampled bilinearly to ``size`` ``(H, W)``."""
        logits = self.conv(self.bn(self.dropout(features)))
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


class DenseView:
    """The evaluation view of a dense task: the image resized to ``size x size`` (no crop, so every
    pixel keeps a prediction; logits are resized back to the mask), clamped and normalised as in
    training. Returns float32 ``[channels, size, size]``."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], channels: int = 3,
                 interpolation: str = "bicubic"):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        self.size, self.channels = size, channels
        self.mean, self.std = tuple(mean), tuple(std)
        self._pipeline = v2.Compose([
            v2.Resize((size, size), interpolation=InterpolationMode(interpolation), antialias=True),
            v2.Normalize(list(mean), list(std)),
        ])

    @classmethod
    def for_preprocessing(cls, prep: Preprocessing | dict[str, Any], size: int | None = None) -> DenseView:
        """The view in a backbone's :class:`~dinokit.data.preprocessing.Preprocessing` (or its dict
        form, an exported backbone's ``preprocessing``): its ``input_size`` unless ``size`` is given."""
        if isinstance(prep, dict):
            prep = Preprocessing.from_dict(prep)
        return cls(size or prep.input_size, prep.mean, prep.std, prep.channels, prep.interpolation)

    def __call__(self, img: Any) -> Tensor:
        x = to_image_tensor(img, self.channels)
        if self.channels in (1, 3):
            x = x.clamp(0, 1)
        return self._pipeline(x)


def patch_feature_map(backbone: Any, x: Tensor, n_last_blocks: int = 1) -> Tensor:
    """Patch features of ``x [B, C, H, W]`` as a map ``[B, n_last_blocks * D, h, w]``."""
    if not getattr(backbone, "has_patch_tokens", False) or backbone.patch_size is None:
        raise TypeError(f"{type(backbone).__name__} gives no patch grid: the segmentation probe needs a "
                        "ViT backbone")
    tokens = backbone.intermediate_patches(x, n_last_blocks) if n_last_blocks > 1 else backbone(x).patches
    h, w = backbone.grid_size(x.shape[-2], x.shape[-1])
    if tokens is None or tokens.shape[1] != h * w:
        raise TypeError(f"{type(backbone).__name__} gave {0 if tokens is None else tokens.shape[1]} patch "
                        f"tokens for a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], h, w)


@torch.inference_mode()
def extract_patch_features(model: Any, dataset: Any, *, n_last_blocks: int = 1, batch_size: int = 64,
                           num_workers: int = 0, device: str | torch.device | None = None,
                           progress: bool = True) -> tuple[Tensor, list[Tensor]]:
    """``(features float32 [N, D, h, w] on the CPU, masks: N long tensors [H, W])`` of a dataset of
    ``(image [C, S, S], mask [H, W])`` pairs, split over the processes as
    :func:`~dinokit.eval.features.extract_features_sharded` (process ``r`` of ``W`` reads samples
    ``r, r + W, ...``) and gathered back in dataset order on every process."""
    backbone = _backbone(model)
    device = torch.device(device) if device else next(backbone.parameters()).device
    rank, world = rank_world()
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    if n < world:
        raise ValueError(f"{n} samples for {world} processes: each process needs at least one")
    own = shard_indices(n, rank, world)
    # every process makes the same number of forward passes (see extract_share)
    mine = Subset(dataset, own + own[:1] * (-(-n // world) - len(own))) if world > 1 else dataset
    loader = DataLoader(mine, batch_size=batch_size, num_workers=num_workers, collate_fn=_pairs)
    was_training = backbone.training
    backbone.eval()
    feats: list[Tensor] = []
    masks: list[Tensor] = []
    try:
        for images, batch_masks in tqdm(loader, desc="patch features", disable=not progress, leave=False):
            feats.append(patch_feature_map(backbone, images.to(device), n_last_blocks).float().cpu())
            masks += batch_masks
    finally:
        backbone.train(was_training)
    f, masks = torch.cat(feats)[: len(own)], masks[: len(own)]
    if world == 1:
        return f, masks
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) != 1:
        raise ValueError("sharded extraction over several processes needs masks of one size")
    comm = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    f_all = gather_shards(f.to(comm), n).cpu()
    m_all = gather_shards(torch.stack(masks).to(comm), n).cpu()
    return f_all, list(m_all.unbind())


def _pairs(batch: list[tuple[Tensor, Any]]) -> tuple[Tensor, list[Tensor]]:
    """Images stacked, masks kept as a list (they may differ in size)."""
    return torch.stack([b[0] for b in batch]), [torch.as_tensor(b[1]).long() for b in batch]


# ------------------------------------------------------------------------------------ scores
def confusion_matrix(pred: Tensor, target: Tensor, n_classes: int, ignore_index: int | None = None) -> Tensor:
    """``[n_classes, n_classes]`` counts, rows = ground truth, columns = prediction; pixels whose
    target is ``ignore_index`` are left out."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    keep &= (target >= 0) & (target < n_classes)
    idx = target[keep] * n_classes + pred[keep].clamp(0, n_classes - 1)
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


@dataclass
class SegmentationResult:
    """Scores (%) of a segmentation probe on the validation set.

    Attributes:
        miou: mean IoU over the classes present (in the ground truth or the predictions).
        pixel_accuracy: correct pixels over scored pixels.
        per_class: for each class id: ``iou`` and ``accuracy`` (None where undefined) and
            ``pixels`` (ground-truth count).
        confusion: ``[C, C]`` counts (rows: truth).
        head: the trained head (for predictions).
        lr: the learning rate it was trained with.
        lr_sweep: held-out mIoU of each learning rate tried (empty when one was given).
    """

    miou: float
    pixel_accuracy: float
    per_class: list[dict[str, float | int | None]]
    confusion: Tensor
    head: LinearSegmentationHead | None = None
    class_names: list[str] = field(default_factory=list)
    lr: float | None = None
    lr_sweep: dict[float, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        names = self.class_names or [str(i) for i in range(len(self.per_class))]
        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy, "lr": self.lr,
                "lr_sweep": {str(k): v for k, v in self.lr_sweep.items()},
                "per_class": {n: c for n, c in zip(names, self.per_class, strict=True)}}


def segmentation_scores(confusion: Tensor) -> tuple[float, float, list[dict[str, float | int | None]]]:
    """``(mIoU %, pixel accuracy %, per class)`` of a confusion matrix (rows = truth)."""
    conf = confusion.double()
    tp = conf.diag()
    truth, predicted = conf.sum(1), conf.sum(0)
    union = truth + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    acc = torch.where(truth > 0, tp / truth.clamp_min(1), torch.full_like(tp, math.nan))
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean() * 100) if bool(present.any()) else 0.0
    total = float(conf.sum())
    pixel = float(tp.sum() / total * 100) if total else 0.0
    per = [{"iou": None if math.isnan(i) else i * 100, "accuracy": None if math.isnan(a) else a * 100,
            "pixels": int(t)} for i, a, t in zip(iou.tolist(), acc.tolist(), truth.tolist(), strict=True)]
    return miou, pixel, per


# ------------------------------------------------------------------------------------ training
def _batches(masks: Sequence[Tensor], order: Sequence[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into batches of at most ``batch_size`` whose masks share one size."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in order:
        groups.setdefault(tuple(masks[i].shape), []).append(i)
    out = []
    for idx in groups.values():
        out += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    return out


def train_segmentation_head(features: Tensor, masks: Sequence[Tensor], n_classes: int, *, epochs: int = 20,
                            lr: float = DEFAULT_LR, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                            batch_size: int = 16, ignore_index: int | None = None, dropout: float = 0.1,
                            seed: int = 0, device: str | torch.device | None = None,
                            progress: bool = True) -> LinearSegmentationHead:
    """Fit :class:`LinearSegmentationHead` on frozen ``features [N, D, h, w]`` against ``masks``
    (N class-id tensors ``[H, W]``); AdamW with a linear warm-up (5 % of the steps) then cosine."""
    if len(features) != len(masks):
        raise ValueError(f"{len(features)} feature maps for {len(masks)} masks")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = torch.device(device or "cpu")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearSegmentationHead(features.shape[1], n_classes, dropout).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = len(_batches(masks, range(len(masks)), batch_size))
    total = epochs * per_epoch
    warmup = max(1, round(0.05 * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ignore = -100 if ignore_index is None else ignore_index
    head.train()
    for _ in tqdm(range(epochs), desc="segmentation head", disable=not progress, leave=False):
        order = torch.randperm(len(masks), generator=g).tolist()
        for idx in _batches(masks, order, batch_size):
            x = features[idx].to(device)
            y = torch.stack([masks[i] for i in idx]).to(device)
            loss = F.cross_entropy(head(x, tuple(y.shape[-2:])), y, ignore_index=ignore)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def predict_masks(head: LinearSegmentationHead, features: Tensor, sizes: Sequence[tuple[int, int]],
                  batch_size: int = 64) -> list[Tensor]:
    """Class-id predictions ``[H, W]`` of each feature map at its mask's size ``(H, W)``."""
    head.eval()
    dev = next(head.parameters()).device
    fake = [torch.empty(s) for s in sizes]
    out: list[Tensor | None] = [None] * len(sizes)
    for idx in _batches(fake, range(len(sizes)), batch_size):
        logits = head(features[idx].to(dev), tuple(sizes[idx[0]]))
        for i, p in zip(idx, logits.argmax(1).cpu(), strict=True):
            out[i] = p
    return out  # type: ignore[return-value]


def score_head(head: LinearSegmentationHead, features: Tensor, masks: Sequence[Tensor], n_classes: int,
               ignore_index: int | None = None) -> SegmentationResult:
    """Score a trained head on ``features`` against ``masks``."""
    preds = predict_masks(head, features, [tuple(m.shape) for m in masks])
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    for p, m in zip(preds, masks, strict=True):
        conf += confusion_matrix(p, m, n_classes, ignore_index)
    miou, pixel, per = segmentation_scores(conf)
    return SegmentationResult(miou, pixel, per, conf, head)


def segmentation_probe(train_features: Tensor, train_masks: Sequence[Tensor], val_features: Tensor,
                       val_masks: Sequence[Tensor], n_classes: int, *,
                       lrs: Sequence[float] | float = PROBE_LRS, ignore_index: int | None = None,
                       class_names: Sequence[str] | None = None, seed: int = 0,
                       **train_kwargs: Any) -> SegmentationResult:
    """Train the linear head on the training features and score it on the validation ones.

    With several learning rates in ``lrs``, each is trained on four fifths of the training images
    (a seeded split) and scored on the last fifth; the best is retrained on every training image.
    Fewer than 5 training images leave nothing to hold out: the official rate is taken when it is
    among ``lrs``, else the first (``lr_sweep`` stays empty).
    ``train_kwargs``: those of :func:`train_segmentation_head` but ``lr`` (``lrs`` sets it)."""
    if train_features.shape[1] != val_features.shape[1]:
        raise ValueError(f"train features have D={train_features.shape[1]} but validation features "
                         f"D={val_features.shape[1]}")
    lrs = [float(lr) for lr in ((lrs,) if isinstance(lrs, (int, float)) else lrs)]
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"learning rates must be > 0, got {lrs}")
    sweep: dict[float, float] = {}
    if len(lrs) > 1 and len(train_masks) < 5:
        lrs = [DEFAULT_LR if DEFAULT_LR in lrs else lrs[0]]
    if len(lrs) > 1:
        order = torch.randperm(len(train_masks), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = len(order) * 4 // 5
        fit_idx, held = order[:cut], order[cut:]
        for lr in lrs:
            head = train_segmentation_head(train_features[fit_idx], [train_masks[i] for i in fit_idx],
                                           n_classes, lr=lr, ignore_index=ignore_index, seed=seed,
                                           **train_kwargs)
            sweep[lr] = score_head(head, train_features[held], [train_masks[i] for i in held], n_classes,
                                   ignore_index).miou
        best = max(lrs, key=lambda lr: sweep[lr])  # of equals, the first in ``lrs``
    else:
        best = lrs[0]
    head = train_segmentation_head(train_features, train_masks, n_classes, lr=best, ignore_index=ignore_index,
                                   seed=seed, **train_kwargs)
    result = score_head(head, val_features, val_masks, n_classes, ignore_index)
    result.class_names = list(class_names or [])
    result.lr, result.lr_sweep = best, sweep
    return result


def linear_segmentation(model: Any, train: Any, val: Any, n_classes: int, *, n_last_blocks: int = 1,
                        batch_size: int = 64, ignore_index: int | None = None,
                        class_names: Sequence[str] | None = None, progress: bool = True,
                        on_features: Callable[[Tensor, list[Tensor]], None] | None = None,
                        **train_kwargs: Any) -> SegmentationResult:
    """The whole protocol from two datasets of ``(image, mask)`` pairs: patch features of both
    (sharded), the head trained on ``train``, scored on ``val``.

    Example::

        from dinokit.data.scenes import SceneDataset
        from dinokit.eval.segmentation import DenseView, linear_segmentation
        view = DenseView(56, mean=(0.286,), std=(0.353,), channels=1)
        result = linear_segmentation(backbone, SceneDataset("train", 500, view),
                                     SceneDataset("test", 200, view), n_classes=11)
        print(result.miou)
    """
    f_tr, m_tr = extract_patch_features(model, train, n_last_blocks=n_last_blocks, batch_size=batch_size,
                                        progress=progress)
    f_va, m_va = extract_patch_features(model, val, n_last_blocks=n_last_blocks, batch_size=batch_size,
                                        progress=progress)
    if on_features is not None:
        on_features(f_va, m_va)
    return segmentation_probe(f_tr, m_tr, f_va, m_va, n_classes, ignore_index=ignore_index,
                              class_names=class_names, progress=progress, **train_kwargs)
