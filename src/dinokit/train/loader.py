"""A training DataLoader whose position can be saved and restored exactly.

* :class:`EpochSampler` draws a permutation per epoch from ``(seed, epoch)``, shards it over the
  processes itself (so Lightning must not replace it) and can start after ``n`` samples.
* :class:`SeededViews` applies the augmentation of sample ``i`` in epoch ``e`` under a torch seed
  derived from ``(seed, e, i)``: the crops do not depend on worker count or on what ran before,
  so a resumed run sees exactly the crops an uninterrupted one would.
* :class:`SeededCollate` runs the collate (which draws DINOv2's masks) under a torch seed derived
  from ``(seed, rank, epoch, first sample of the batch)``: every process and loader worker draws
  its own masks, reproducibly, whatever the worker count, and without touching the training RNG.
* :class:`ResumableDataLoader` counts the batches it has yielded and exposes
  ``state_dict``/``load_state_dict``, which Lightning stores in its checkpoints. Its workers
  ignore SIGINT and SIGTERM (:class:`IgnoreStopSignals`): those are the main process's to handle.

Crops depend on the sample only (not on the rank), so a run sees the same crops at any world size.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from dinokit.config import ConfigError
from dinokit.distributed import rank_world
from dinokit.seeding import cpu_rng, sample_seed
from dinokit.worker_signals import IgnoreStopSignals, stop_signals_blocked

_MASK_SALT = 0x5EED_0F_3A5C
_ITEM_MASK_SALT = 0x5A3F_1E_77D1


class SampleKey(int):
    """A sampler key, ``epoch * len(dataset) + index``, that also knows ``pos``: the sample's place
    in its process's epoch (what tells the dataset which optimiser step, and so which training
    stage, the sample is drawn for)."""

    pos: int

    def __new__(cls, key: int, pos: int) -> SampleKey:
        self = super().__new__(cls, key)
        self.pos = int(pos)
        return self

    def __reduce__(self) -> tuple[Any, tuple[int, int]]:
        return SampleKey, (int(self), self.pos)


class EpochSampler(Sampler[int]):
    """Seeded shuffling per epoch, sharded over processes, dropping the ragged tail.

    Yields ``epoch * len(dataset) + index`` (a :class:`SampleKey`, which also carries the sample's
    position in the process's epoch) so the dataset knows the epoch of each sample.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if n < 1:
            raise ValueError("the training dataset is empty")
        self.n, self.seed, self.shuffle, self.drop_last = n, seed, shuffle, drop_last
        self.epoch = 0
        self.start = 0  # samples of this process to skip (set when resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def _indices(self) -> list[int]:
        rank, world = rank_world()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.n // world if self.drop_last else math.ceil(self.n / world)
        if not self.drop_last:
            order += order[: per_rank * world - self.n]
        return order[rank : per_rank * world : world]

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.n
        keys = self._indices()[self.start :]
        return iter([SampleKey(base + i, self.start + j) for j, i in enumerate(keys)])

    def __len__(self) -> int:
        # The full epoch, also when resuming: Lightning counts the batches already done itself.
        _, world = rank_world()
        return self.n // world if self.drop_last else math.ceil(self.n / world)


class SeededViews(Dataset):
    """``dataset[i]`` (an image or ``(image, label, ...)``) -> ``(transform(image), label)``, with
    the transform's randomness seeded from ``(seed, epoch, i)``.

    ``staged(epoch, pos) -> transform`` (optional) picks the transform of the training stage a
    sample at position ``pos`` of its process's epoch is drawn for (stages with their own crops);
    keys without a position (not from :class:`EpochSampler`) use ``transform``.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any], seed: int = 0,
                 staged: Callable[[int, int], Callable[[Any], Any]] | None = None):
        self.dataset, self.transform, self.seed, self.staged = dataset, transform, seed, staged
        self.n = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> tuple[Any, int]:
        epoch, index = divmod(int(key), self.n)
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            image, label = item[0], (int(item[1]) if len(item) > 1 and item[1] is not None else -1)
        else:
            image, label = item, -1
        pos = getattr(key, "pos", None)
        transform = self.transform if self.staged is None or pos is None else self.staged(epoch, pos)
        with cpu_rng(sample_seed(self.seed, epoch, index)):
            views = transform(image)
        return views, label

    def __getitems__(self, keys: list[int]) -> _Batch:
        """A batch of items that remembers its keys (for :class:`SeededCollate`)."""
        out = _Batch(self[k] for k in keys)
        out.keys, out.n = list(keys), self.n  # type: ignore[attr-defined]
        return out


class _Batch(list):
    """The items of one batch, with the sampler keys they came from (read by SeededCollate)."""

    keys: list[int]


class SeededCollate:
    """Wrap a collate function so its randomness (the masks) comes from a seed of
    ``(seed, rank, epoch, first sample index of the batch)`` instead of the process's RNG.

    ``rank`` is set by :class:`ResumableDataLoader` in the main process before workers start.
    Batches not made by :meth:`SeededViews.__getitems__` (no keys) are collated unseeded.

    A collate with ``mask_sampling == "sample"`` (``ibot.mask_sampling=sample``) is also given one
    seed per item, :meth:`item_seed` of ``(seed, epoch, sample index)`` only: each sample's masks
    are then the same whatever batch, process or worker it lands in.
    """

    def __init__(self, collate: Callable[[Any], Any], seed: int = 0,
                 staged: Callable[[int, int], Callable[[Any], Any]] | None = None):
        self.collate, self.seed, self.rank, self.staged = collate, seed, 0, staged

    def batch_seed(self, first_key: int, n: int) -> int:
        epoch, index = divmod(int(first_key), n)
        return sample_seed(self.seed ^ _MASK_SALT, epoch * 65_537 + self.rank, index)

    def item_seed(self, key: int, n: int) -> int:
        """The mask seed of one sample: ``(seed, epoch, index)``, not the rank nor the batch."""
        epoch, index = divmod(int(key), n)
        return sample_seed(self.seed ^ _ITEM_MASK_SALT, epoch, index)

    def __call__(self, batch: Any) -> Any:
        keys, n = getattr(batch, "keys", None), getattr(batch, "n", None)
        if not keys or not n:
            return self.collate(batch)
        collate = self.collate
        if self.staged is not None and getattr(keys[0], "pos", None) is not None:
            collate = self.staged(int(keys[0]) // n, keys[0].pos)
        kwargs = {}
        if getattr(collate, "mask_sampling", "batch") == "sample":
            kwargs["sample_seeds"] = [self.item_seed(k, n) for k in keys]
        with cpu_rng(self.batch_seed(keys[0], n)):
            return collate(list(batch), **kwargs)


class ByStage:
    """``(epoch, pos) -> items[stage]``: the item of the training stage that a sample at position
    ``pos`` of its process's epoch is drawn for. The optimiser step of that sample is
    ``epoch * steps_per_epoch + (pos // batch_size) // accumulate``; ``starts`` are the stages'
    first steps (:func:`dinokit.clock.place_stages`). Picklable, for loader workers."""

    def __init__(self, items: list[Any], starts: list[int], *, steps_per_epoch: int, batch_size: int,
                 accumulate: int = 1):
        self.items, self.starts = list(items), list(starts)
        self.steps_per_epoch, self.batch_size, self.accumulate = steps_per_epoch, batch_size, accumulate

    def step(self, epoch: int, pos: int) -> int:
        return epoch * self.steps_per_epoch + (pos // self.batch_size) // self.accumulate

    def __call__(self, epoch: int, pos: int) -> Any:
        return self.items[max(0, bisect.bisect_right(self.starts, self.step(epoch, pos)) - 1)]


class ResumableDataLoader(DataLoader):
    """DataLoader over an :class:`EpochSampler` that remembers how far the epoch got."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, staged_collate: Callable[[int, int], Any] | None = None,
                 **kwargs: Any):
        n = len(dataset)  # type: ignore[arg-type]
        sampler = EpochSampler(n, seed=seed, shuffle=shuffle, drop_last=drop_last)
        # Its own generator: starting an epoch must not draw from the global RNG, or a resumed
        # run would see the training RNG (drop path, masks) shifted by one draw.
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        kwargs["collate_fn"] = SeededCollate(kwargs.get("collate_fn") or default_collate, seed,
                                             staged=staged_collate)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                         **kwargs)
        self.seed = seed
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        rank, _ = rank_world()
        self.collate_fn.rank = rank  # type: ignore[attr-defined]  (before the workers start)
        if self.generator is not None:  # worker seeds: per process and epoch, same after a resume
            self.generator.manual_seed(sample_seed(self.seed, sampler.epoch, 2**40 + rank))
        self._yielded = sampler.start // self.batch_size  # type: ignore[operator]
        if self.num_workers > 0 and not isinstance(self.worker_init_fn, IgnoreStopSignals):
            # Wrapped here, not in __init__: Lightning adds its worker seeding only when none is set.
            self.worker_init_fn = IgnoreStopSignals(self.worker_init_fn)
        with stop_signals_blocked():  # the workers start here (once, with persistent workers)
            batches = super().__iter__()
        for batch in batches:
            self._yielded += 1
            yield batch
        sampler.start = 0

    def state_dict(self) -> dict[str, int]:
        """The epoch, the batches this process has taken in it, and the global batch they made
        (``batch_size`` per process x ``world`` processes)."""
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        _, world = rank_world()
        return {"epoch": sampler.epoch, "batches": self._yielded, "batch_size": int(self.batch_size or 0),
                "world": world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` stopped, also at another world size when the global batch is
        the same (each global batch is ``order[k * G : (k + 1) * G]`` of the epoch's permutation,
        dealt over the processes); a different global batch is refused (ConfigError)."""
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        if "world" in state and "batch_size" in state:
            _, world = rank_world()
            saved, now = int(state["world"]) * int(state["batch_size"]), world * int(self.batch_size or 0)
            if saved != now:
                procs = lambda n: f"{n} process" + ("es" if n != 1 else "")  # noqa: E731
                hint = (f"; data.batch_size={saved // world} with {procs(world)} keeps it"
                        if saved % world == 0 else "")
                raise ConfigError(
                    f"data.batch_size: the checkpoint's run took global batches of {saved} "
                    f"({procs(int(state['world']))} x {state['batch_size']}), this run would take {now} "
                    f"({procs(world)} x {self.batch_size}): an exact resume needs the same global "
                    f"batch{hint}")
        sampler.epoch = int(state["epoch"])
        sampler.start = int(state["batches"]) * int(self.batch_size)  # type: ignore[arg-type]
        self._yielded = int(state["batches"])
