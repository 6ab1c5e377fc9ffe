"""The process layout and the cross-process reductions used by centring, Sinkhorn-Knopp and KoLeo.

Each helper is a no-op in a single process, so the same code runs on a laptop and on many nodes.
They never move data to the host, so they add no host-device synchronisation to the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all processes (in place when distributed); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over all processes (in place when distributed); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x.div_(dist.get_world_size())
    return x


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping the gradient of the local part.

    All processes must pass the same shape. The local slice is the input tensor itself, so
    gradients flow to this process's samples only (as in DINOv2's KoLeo over all ranks).
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)
