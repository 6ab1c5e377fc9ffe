"""KoLeo regulariser (Sablayrolles et al., ICLR 2019; DINOv2, Oquab et al. 2024, Sec. 4):
``L = -1/n sum_i log(d_i + eps)``, ``d_i`` the distance from the L2-normalised ``x_i`` to its
nearest neighbour among the other samples; it spreads the batch's features over the sphere.

As the official ``KoLeoLoss`` (dinov2/dinov3 ``loss/koleo_loss.py``): ``F.normalize`` with
``eps``, the nearest neighbour by the largest dot product with the diagonal set to -1, the
distance by ``nn.PairwiseDistance(2, eps=1e-8)`` (i.e. ``||x_i - x_j + 1e-8||``), all in fp32.
DINOv2 adds the KoLeo of each global crop (``sum`` over crops, :func:`koleo_loss_over_crops`);
DINOv3 takes the mean over crops times ``n_global``: the same number.

``all_processes=True`` (``koleo.all_processes``; off by default, as in DINOv2 and DINOv3's
default ``koleo_loss_distributed: false``) is DINOv3's ``KoLeoLossDistributed`` with ``topk=1``:
the neighbours are searched in the all-gathered global batch and the gradient flows back through
the gather (``torch.distributed.nn.functional.all_gather``, summed over processes), so that with
the processes' gradients averaged (DDP/FSDP) a run equals one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.nn.functional import all_gather

from dinokit.distributed import is_distributed, rank_world

#: ``eps`` of the official ``nn.PairwiseDistance(2, eps=1e-8)``.
PDIST_EPS = 1e-8


def koleo_loss(x: Tensor, eps: float = 1e-8, all_processes: bool = False) -> Tensor:
    """``x [B, D]`` -> scalar.

    ``all_processes``: neighbours are searched in the batch of every process (DINOv3's
    ``KoLeoLossDistributed`` with ``topk=1``): the loss is the mean over this process's samples
    and the gradient also reaches the other processes' samples that are neighbours of these (the
    gather's backward sums over processes; a collective in the backward pass too, so every
    process must call it with the same batch size). With a single sample and no other process there
    is no neighbour: the loss is ``0 * x.sum()`` (the official code would pair the sample with
    itself).
    """
    if x.ndim != 2:
        raise ValueError(f"koleo input must be [B, D], got shape {tuple(x.shape)}")
    z = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    offset, pool = 0, z
    if all_processes and is_distributed():
        pool = torch.cat(all_gather(z), dim=0)
        offset = rank_world()[0] * z.shape[0]
    if pool.shape[0] < 2:
        return x.sum() * 0.0
    with torch.no_grad():
        dots = z @ pool.t()
        n_local, n_all = dots.shape
        dots.view(-1)[offset :: n_all + 1][:n_local].fill_(-1.0)  # the official diagonal trick
        nn_idx = dots.argmax(dim=1)
    dist_nn = F.pairwise_distance(z, pool[nn_idx], p=2.0, eps=PDIST_EPS)
    return -torch.log(dist_nn + eps).mean()


def koleo_loss_over_crops(cls_tokens: Tensor, eps: float = 1e-8, all_processes: bool = False) -> Tensor:
    """DINOv2's aggregation: ``sum_v koleo(cls_tokens[v])`` over the global crops ``[n_global, B, D]``
    (never across crops: two crops of one image are not neighbours). Multiply by the KoLeo weight."""
    if cls_tokens.ndim != 3:
        raise ValueError(f"cls_tokens must be [n_global, B, D], got shape {tuple(cls_tokens.shape)}")
    return torch.stack([koleo_loss(c, eps, all_processes) for c in cls_tokens.unbind(0)]).sum()
