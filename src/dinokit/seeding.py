"""Seeds derived from a run's seed, one per random draw of the data pipeline.

A sample's crops are drawn under :func:`sample_seed` of ``(run seed, epoch or pass, sample)``, so
they depend on the sample only: not on the process, the loader worker, the batch, or what ran
before. A resumed run, a run at another world size and a run with another worker count therefore
see the same crops. Both training loaders use it: the map-style one
(:mod:`dinokit.train.loader`) and the shard stream (:mod:`dinokit.data.streaming`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_MIX = 0x9E3779B97F4A7C15
_MIX2 = 0xBF58476D1CE4E5B9


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, well mixed from its three inputs."""
    x = (seed * 1_000_003 + epoch) * _MIX + index * _MIX2
    x ^= x >> 31
    return x & 0x7FFF_FFFF_FFFF_FFFF


@contextlib.contextmanager
def cpu_rng(seed: int) -> Iterator[None]:
    """The CPU generator seeded with ``seed`` for the block, and restored after it.

    Only the CPU generator, which draws the loaders' crops and masks: ``torch.manual_seed`` would
    also seed every accelerator's generator, which where CUDA is not initialised (a loader worker,
    a CPU machine) queues the seed with a formatted stack trace for every sample, and where it is
    (a GPU loader in the main process) resets the training device's generator from the loader,
    sample after sample."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
