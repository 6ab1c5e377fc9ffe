"""Batched feature extraction from a frozen backbone (the teacher's by default).

:func:`extract_features` reads one loader in one process. :func:`extract_features_sharded` splits a
dataset over the processes (process ``r`` of ``W`` reads samples ``r, r + W, ...``: each sample
exactly once, no padding) and gathers the features back in dataset order on every process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dinokit.backbones.base import cls_embedding
from dinokit.distributed import rank_world

KINDS = ("cls", "avgpool", "cls+avgpool", "last_blocks", "last_blocks+avgpool")


def _backbone(model: Any) -> Any:
    return model.deployed_backbone if hasattr(model, "deployed_backbone") else model


def _features(backbone: Any, x: Tensor, kind: str, n_last_blocks: int) -> Tensor:
    if kind.startswith("last_blocks"):
        f = backbone.intermediate_cls(x, n_last_blocks)
        if kind == "last_blocks":
            return f
        out = backbone(x)
        return torch.cat([f, _avgpool(out, backbone)], dim=-1)
    if kind == "cls":
        return cls_embedding(backbone, x)
    out = backbone(x)
    if kind == "avgpool":
        return _avgpool(out, backbone)
    return torch.cat([out.cls, _avgpool(out, backbone)], dim=-1)


def _avgpool(out: Any, backbone: Any) -> Tensor:
    if out.patches is None or out.patches.shape[1] == 0:
        raise TypeError(f"{type(backbone).__name__} gives no patch tokens: use kind='cls'")
    return out.patches.mean(dim=1)


@torch.inference_mode()
def extract_features(model: Any, loader: Iterable[Any], *, kind: str = "cls", n_last_blocks: int = 4,
                     device: str | torch.device | None = None, progress: bool = True,
                     out_device: str | torch.device | None = "cpu") -> tuple[Tensor, Tensor | None]:
    """Features ``[N, D]`` (float32, on ``out_device``; None = the model's device) and labels
    ``[N]`` (None when unlabelled).

    Args:
        model: a :class:`~dinokit.backbones.Backbone` or a method (the network it delivers,
            ``deployed_backbone``, is used).
        loader: batches of images, or ``(images, labels, ...)``; label -1 means unlabelled.
        kind: ``cls`` | ``avgpool`` (mean patch token) | ``cls+avgpool`` | ``last_blocks`` (CLS of
            the last ``n_last_blocks`` blocks, DINO's linear-eval input) | ``last_blocks+avgpool``.
    """
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
            f = _features(backbone, x.to(device), kind, n_last_blocks).float()
            feats.append(f.to(out_device) if out_device is not None else f)
            labels.append(torch.as_tensor(y).long() if y is not None
                          else torch.full((len(x),), -1, dtype=torch.long))
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("the loader gave no images")
    y_all = torch.cat(labels).to(feats[0].device)
    return torch.cat(feats), (None if bool((y_all < 0).all()) else y_all)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """The samples process ``rank`` of ``world`` reads: ``rank, rank + world, ...`` (each once)."""
    return list(range(rank, n, world))


def gather_shards(x: Tensor, n: int) -> Tensor:
    """The per-process results ``x`` (rows of :func:`shard_indices` order) of every process, put
    back in dataset order ``[n, ...]`` on every process (a collective; identity in one process)."""
    _, world = rank_world()
    if world == 1:
        return x
    rows = -(-n // world)  # ceil: the largest share; smaller shares are padded for all_gather
    pad = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: len(x)] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    for r, part in enumerate(parts):
        k = len(shard_indices(n, r, world))
        out[r::world] = part[:k]
    return out


def extract_share(model: Any, dataset: Any, *, batch_size: int = 256, num_workers: int = 0,
                  kind: str = "cls", n_last_blocks: int = 4, device: str | torch.device | None = None,
                  progress: bool = False, out_device: str | torch.device | None = "cpu",
                  ) -> tuple[Tensor, Tensor | None]:
    """Features of this process's :func:`shard_indices` of ``dataset`` (all of it in one process).

    Every process makes the same number of forward passes (FSDP all-gathers parameters in each
    one, so an extra batch on one process would wait forever): a smaller share is padded with a
    repeat of its first sample, whose rows are dropped from the result.
    """
    rank, world = rank_world()
    n = len(dataset)
    own = shard_indices(n, rank, world)
    mine = Subset(dataset, own + own[:1] * (-(-n // world) - len(own))) if world > 1 else dataset
    f, y = extract_features(model, DataLoader(mine, batch_size=batch_size, num_workers=num_workers),
                            kind=kind, n_last_blocks=n_last_blocks, device=device, progress=progress,
                            out_device=out_device)
    return f[: len(own)], (None if y is None else y[: len(own)])


def extract_features_sharded(model: Any, dataset: Any, *, batch_size: int = 256, num_workers: int = 0,
                             kind: str = "cls", n_last_blocks: int = 4,
                             device: str | torch.device | None = None, progress: bool = False,
                             out_device: str | torch.device | None = "cpu") -> tuple[Tensor, Tensor | None]:
    """:func:`extract_features` over ``dataset`` split across the processes: each reads its
    :func:`shard_indices`, the features are gathered in dataset order on every process. Items
    are images or ``(image, label, ...)``. Under gloo the gather runs on the CPU, under NCCL on the
    model's device."""
    _, world = rank_world()
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    if n < world:  # every process knows: all raise, none waits in the gather
        raise ValueError(f"{n} samples for {world} processes: each process needs at least one")
    f, y = extract_share(model, dataset, batch_size=batch_size, num_workers=num_workers, kind=kind,
                         n_last_blocks=n_last_blocks, device=device, progress=progress,
                         out_device=out_device)
    if world == 1:
        return f, y
    comm = f.device if dist.get_backend() == "nccl" else torch.device("cpu")
    labels = y if y is not None else torch.full((len(f),), -1, dtype=torch.long, device=f.device)
    f_all = gather_shards(f.to(comm), n).to(f.device)
    y_all = gather_shards(labels.to(comm), n).to(f.device)
    return f_all, (None if bool((y_all < 0).all()) else y_all)
