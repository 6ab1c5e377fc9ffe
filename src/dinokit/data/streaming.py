"""Sharded streaming data: WebDataset-format tar files read with the ``webdataset`` library.

For data that does not fit on a local disk or in a folder listing. A shard is a tar file whose
members are ``<key>.<ext>`` (the image bytes, ``jpg``/``png``/...) and ``<key>.cls`` (the label,
optional); :func:`write_shards` (``dinokit data shard``) writes them from an image folder plus an
``index.json`` with the per-shard sample counts.

Reading (:class:`ShardStream`, :class:`StreamLoader`), as DINOv2 does with its infinite sampler:

* The stream is endless and made of *passes*. In pass ``p`` the shard list is permuted from
  ``(seed, p)`` and cut into ``S = world_size * num_workers`` *slots*: slot ``s`` (process ``r``,
  loader worker ``w``, ``s = r * num_workers + w``) reads shards ``s, s + S, ...`` (every shard
  read by exactly one slot, so every sample is seen exactly once per pass across the world) and
  mixes them in a shuffle buffer seeded from ``(seed, p, s)``.
* An *epoch* is a fixed number of iterations (``iterations_per_epoch``), decoupled from passes.
* Each batch carries its slot's position ``(pass, samples read in the pass)``; the loader keeps
  the position of every slot it has consumed, so ``state_dict``/``load_state_dict`` resume the
  stream exactly (a resumed slot replays its pass up to the position without decoding).
* Crops are drawn under a seed of ``(seed, pass, sample key)``, masks (in the collate) under a seed
  of ``(seed, slot, pass, position)``: every process and worker draws its own, reproducibly.
* A damaged shard (truncated, unreadable, not a tar) is read up to the damage; the rest of it is
  skipped with a warning naming it, once per run, and it is listed in ``damaged`` (over all
  loader workers) for the end-of-run summary. With ``strict`` it stops the run with a
  :class:`ShardReadError` naming it instead. What is read of a damaged shard is the same on
  every pass, so positions and resumes stay exact.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dinokit.atomic import atomic_write, write_text
from dinokit.data.datasets import DEFAULT_MAX_IMAGE_PIXELS, ImageFolderDataset, read_image
from dinokit.distributed import rank_world as _rank_world
from dinokit.seeding import cpu_rng, sample_seed
from dinokit.worker_signals import stop_signals_blocked

INDEX_FILE = "index.json"
_MASK_SALT = 0x5EED_0F_3A5C
#: What reading a damaged shard raises (truncated or corrupt tar, unreadable or missing file).
_SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)


class ShardReadError(OSError):
    """A shard that cannot be read to its end; the message names it."""


def _wds() -> Any:
    try:
        import webdataset
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("streaming shards need the 'webdataset' package: pip install webdataset") from e
    return webdataset


# ------------------------------------------------------------------------------------- writing
def write_shards(root: str | Path, out_dir: str | Path, *, shard_size: int = 1000,
                 prefix: str = "shard", seed: int | None = 0) -> list[Path]:
    """Write the images under ``root`` (an image folder, class sub-folders give labels) into
    WebDataset tar shards of ``shard_size`` samples in ``out_dir``; returns the shard paths.

    Image bytes are stored as found (no re-encoding); ``seed`` shuffles the order first so that
    shards mix the classes (None keeps the sorted folder order). ``out_dir/index.json`` lists the
    shards with their sample counts and the class names; it is written last. Each file is written
    under a temporary name and renamed once complete (:mod:`dinokit.atomic`), so a killed writer
    never leaves a truncated shard under a shard's name.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = ImageFolderDataset(root)
    order = list(range(len(folder.paths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(f"{prefix}-*.tar")):
        raise FileExistsError(f"{out} already holds {prefix}-*.tar shards; choose an empty folder")
    wds = _wds()
    shards: list[dict[str, Any]] = []
    width = max(6, len(str(len(order) // shard_size)))
    for start in range(0, len(order), shard_size):
        name = f"{prefix}-{len(shards):0{width}d}.tar"
        chunk = order[start:start + shard_size]
        with atomic_write(out / name) as f, wds.TarWriter(f, encoder=False) as sink:
            for i in chunk:
                path = folder.paths[i]
                ext = path.suffix.lower().lstrip(".")
                sample = {"__key__": f"{i:09d}", ext: path.read_bytes()}
                if folder.targets[i] >= 0:
                    sample["cls"] = str(folder.targets[i]).encode()
                sink.write(sample)
        shards.append({"url": name, "count": len(chunk)})
    index = {"format": "webdataset", "total": len(order), "classes": folder.classes, "shards": shards}
    write_text(out / INDEX_FILE, json.dumps(index, indent=1))
    return [out / s["url"] for s in shards]


def list_shards(source: str | Path | Sequence[str]) -> list[str]:
    """Shard URLs from a folder (its ``index.json``, else its ``*.tar``), an ``index.json``, a
    brace pattern (``data/shard-{000000..000127}.tar``) or a list."""
    if not isinstance(source, (str, Path)):
        urls = [str(u) for u in source]
    else:
        text = str(source)
        path = Path(text)
        if path.is_dir():
            path = path / INDEX_FILE if (path / INDEX_FILE).is_file() else path
        if path.is_file() and path.suffix == ".json":
            index = json.loads(path.read_text())
            urls = [str(path.parent / s["url"]) for s in index["shards"]]
        elif path.is_dir():
            urls = sorted(str(p) for p in path.glob("*.tar"))
        else:
            import braceexpand

            urls = list(braceexpand.braceexpand(text))
    if not urls:
        raise FileNotFoundError(f"no shards found in {source!r} (a folder of .tar shards, its "
                                f"index.json, or a brace pattern)")
    return urls


# ------------------------------------------------------------------------------------- reading
def _key_hash(key: str) -> int:
    return zlib.crc32(key.encode())


def decode_sample(sample: dict[str, Any], max_pixels: int | None = None) -> tuple[Any, int]:
    """``(PIL image, label)`` of one raw tar sample (label -1 when it has no ``cls``);
    ``max_pixels``: see :func:`~dinokit.data.datasets.read_image`."""
    image_ext = next((k for k in sample if not k.startswith("__") and k != "cls"), None)
    if image_ext is None:
        raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no image")
    label = int(sample["cls"]) if "cls" in sample else -1
    image = read_image(io.BytesIO(sample[image_ext]),  # type: ignore[arg-type]
                       max_pixels=max_pixels or DEFAULT_MAX_IMAGE_PIXELS)
    return image, label


def _damage(e: BaseException) -> str:
    """What is wrong with a shard, without the stream objects webdataset appends to errors."""
    first = str(e.args[0]) if e.args else ""
    if isinstance(e, OSError) and e.strerror:
        first = e.strerror
    return first.split(" @ ")[0].strip() or type(e).__name__


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle: fill ``size`` items, then emit a random one per item read."""
    buf: list[Any] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(len(buf))
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Endless stream of collated batches ``(batch, slot, pass, position)`` (see module docstring).

    Args:
        shards: shard URLs (or anything :func:`list_shards` accepts).
        batch_size: samples per batch of one process.
        transform: PIL image -> views (e.g. a multi-crop transform); None = the image itself.
        collate: list of ``(views, label)`` -> batch.
        seed: the global seed.
        shuffle: buffer size of the sample shuffle (0 = read order); shard order is always permuted.
        strict: a damaged shard raises :class:`ShardReadError` (else the rest of it is skipped
            with a warning, and it is listed in ``damaged``).
        max_pixels: images with more pixels are refused as decompression bombs (see
            :func:`~dinokit.data.datasets.read_image`; None = its default).
    """

    def __init__(self, shards: str | Path | Sequence[str], batch_size: int,
                 transform: Callable[[Any], Any] | None = None,
                 collate: Callable[[list[Any]], Any] | None = None, seed: int = 0, shuffle: int = 1000,
                 *, strict: bool = False, max_pixels: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle < 0:
            raise ValueError(f"shuffle (buffer size) must be >= 0, got {shuffle}")
        self.urls = list_shards(shards)
        self.batch_size, self.transform, self.seed, self.shuffle = batch_size, transform, seed, shuffle
        self.collate = collate if collate is not None else list
        self.strict, self.max_pixels = strict, max_pixels
        self._index = {u: i for i, u in enumerate(self.urls)}
        # One flag per shard in shared memory: loader workers mark the damaged shards they find,
        # so the main process can list them at the end of a run (and each is warned about once).
        self._damaged = torch.zeros(len(self.urls), dtype=torch.bool).share_memory_()
        # Set by StreamLoader in the main process before workers start:
        self.rank, self.world = 0, 1
        self.starts: dict[int, tuple[int, int]] = {}  # slot -> (pass, position)
        self.rotate = 0  # worker w of this iterator plays slot (w + rotate) % num_workers

    @property
    def damaged(self) -> list[str]:
        """Shards found damaged so far (the rest of each was skipped), in this process or its
        loader workers."""
        return [self.urls[i] for i in self._damaged.nonzero().flatten().tolist()]

    def _shard_samples(self, url: str) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard, up to the damage if it is damaged; the file is closed when
        the shard is done or the stream is dropped."""
        wds = _wds()
        try:
            with contextlib.closing(wds.gopen(url, "rb")) as stream:
                files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
                yield from wds.tariterators.group_by_keys(files)
        except _SHARD_ERRORS as e:
            if self.strict:
                raise ShardReadError(f"damaged shard {url}: {_damage(e)} (data.strict_images=true "
                                     "stops here; without it the rest of the shard is skipped)") from None
            i = self._index[url]
            if not bool(self._damaged[i]):
                self._damaged[i] = True
                warnings.warn(f"damaged shard {url}: {_damage(e)}; the rest of this shard is skipped",
                              stacklevel=2)

    def slot_of(self, worker: int, num_workers: int) -> int:
        return self.rank * num_workers + (worker + self.rotate) % num_workers

    def _raw(self, slot: int, n_slots: int, pass_: int) -> Iterator[dict[str, Any]]:
        """Raw samples of ``slot`` in pass ``pass_``, shuffled, not decoded."""
        order = list(self.urls)
        random.Random(self.seed * 1_000_003 + pass_).shuffle(order)
        samples = (s for u in order[slot::n_slots] for s in self._shard_samples(u))
        if self.shuffle:
            rng = random.Random((self.seed * 1_000_003 + pass_) * 65_537 + slot)
            samples = shuffle_buffer(samples, self.shuffle, rng)
        return iter(samples)

    def _view(self, sample: dict[str, Any], pass_: int) -> tuple[Any, int]:
        image, label = decode_sample(sample, self.max_pixels)
        if self.transform is None:
            return image, label
        with cpu_rng(sample_seed(self.seed, pass_, _key_hash(sample["__key__"]))):
            return self.transform(image), label

    def __iter__(self) -> Iterator[tuple[Any, int, int, int]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n_slots = self.world * n_workers
        if len(self.urls) < n_slots:
            raise ValueError(f"{len(self.urls)} shard(s) for {self.world} process(es) x {n_workers} "
                             f"loader worker(s): every slot needs at least one shard; write smaller "
                             f"shards (dinokit data shard --shard-size) or use fewer data.num_workers")
        slot = self.slot_of(worker, n_workers)
        batch: list[Any] = []
        for pass_, pos, sample in self._samples(slot, n_slots):
            batch.append(self._view(sample, pass_))
            if len(batch) == self.batch_size:
                with cpu_rng(sample_seed(self.seed ^ _MASK_SALT, pass_, slot * 2**32 + pos)):
                    out = self.collate(batch)
                yield out, slot, pass_, pos
                batch = []

    def _samples(self, slot: int, n_slots: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """``(pass, position after it, raw sample)`` forever, from the slot's start position;
        batches run across pass ends, so no sample is dropped."""
        pass_, pos = self.starts.get(slot, (0, 0))
        while True:
            raw = self._raw(slot, n_slots, pass_)
            for _ in range(pos):  # resume: replay the buffer, decoding nothing
                next(raw)
            read = pos
            for sample in raw:
                read += 1
                yield pass_, read, sample
            if read == 0:
                raise ValueError(f"slot {slot} read no sample from its shards in pass {pass_}")
            pass_, pos = pass_ + 1, 0


class StreamLoader:
    """Iterate a :class:`ShardStream` ``iterations_per_epoch`` batches at a time, resumably.

    One DataLoader iterator lives across epochs (like DINOv2's infinite sampler), so prefetched
    batches carry over to the next epoch instead of being lost. ``state_dict`` holds the epoch,
    the batches done in it and the position of every slot; Lightning stores it in checkpoints.
    """

    def __init__(self, stream: ShardStream, iterations_per_epoch: int, *, num_workers: int = 0,
                 **loader_kwargs: Any):
        if iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be >= 1, got {iterations_per_epoch}")
        self.dataset, self.iterations, self.num_workers = stream, iterations_per_epoch, num_workers
        self.batch_size = stream.batch_size
        self.loader_kwargs = loader_kwargs
        self.epoch, self.batches = 0, 0
        self.positions: dict[int, tuple[int, int]] = {}
        self.consumed = 0  # batches this process has taken, over the whole run
        self.slots: int | None = None
        self._it: Iterator[Any] | None = None

    def __len__(self) -> int:
        return self.iterations

    def _start(self) -> Iterator[Any]:
        rank, world = _rank_world()
        workers = max(self.num_workers, 1)
        if self.positions and self.slots not in (None, world * workers):
            # Another world size or worker count: slots own other shards; restart the oldest pass.
            first = min(p for p, _ in self.positions.values())
            warnings.warn(f"the stream was saved with {self.slots} slots (processes x workers) and "
                          f"resumes with {world * workers}: it restarts at the beginning of pass "
                          f"{first}, so some samples of the interrupted pass are seen twice",
                          stacklevel=3)
            self.positions = {s: (first, 0) for s in range(world * workers)}
        self.slots = world * workers
        self.dataset.rank, self.dataset.world = rank, world
        self.dataset.starts = dict(self.positions)
        # The DataLoader serves workers round-robin from worker 0: rotate the slots so that the
        # next batch comes from the slot an uninterrupted run would serve next.
        self.dataset.rotate = self.consumed % workers
        dl = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                        persistent_workers=False, **self.loader_kwargs)
        with stop_signals_blocked():  # workers start with the stop signals blocked, then ignore them
            return iter(dl)

    def __iter__(self) -> Iterator[Any]:
        if self.batches >= self.iterations:  # a new epoch
            self.epoch, self.batches = self.epoch + 1, 0
        if self._it is None:
            self._it = self._start()
        while self.batches < self.iterations:
            batch, slot, pass_, pos = next(self._it)
            self.positions[slot] = (pass_, pos)
            self.batches += 1
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "consumed": self.consumed,
                "slots": self.slots, "positions": {str(k): list(v) for k, v in self.positions.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.consumed, self.slots = int(state["consumed"]), state.get("slots")
        self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in state["positions"].items()}
        self._it = None
