"""KoLeo regulariser (Sablayrolles et al., ICLR 2019; DINOv2, Oquab et al. 2024, Sec. 4):
``L = -1/n sum_i log(d_i + eps)``, ``d_i`` the distance from the L2-normalised ``x_i`` to its
nearest neighbour among the other samples; it spreads the batch's features over the sphere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dinokit.distributed import all_gather_cat, is_distributed


def koleo_loss(x: Tensor, eps: float = 1e-8, all_processes: bool = False) -> Tensor:
    """``x [B, D]`` -> scalar. Finite with duplicates (``log(eps)``); with one sample (and no other
    process) there is no neighbour and the loss is ``0 * x.sum()`` (keeps the autograd graph)."""
    if x.ndim != 2:
        raise ValueError(f"koleo input must be [B, D], got shape {tuple(x.shape)}")
    z = F.normalize(x.float(), dim=-1, eps=1e-8)
    pool = all_gather_cat(z) if all_processes and is_distributed() else z
    if pool.shape[0] < 2:
        return x.sum() * 0.0
    offset = 0
    if pool is not z:
        import torch.distributed as dist

        offset = dist.get_rank() * z.shape[0]
    with torch.no_grad():
        sim = z @ pool.t()
        rows = torch.arange(z.shape[0], device=z.device)
        sim[rows, rows + offset] = -2.0  # exclude self
        nn_idx = sim.argmax(dim=1)
    dist_nn = (z - pool[nn_idx]).norm(dim=-1)
    return -torch.log(dist_nn + eps).mean()
