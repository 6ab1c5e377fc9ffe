"""Crash-safe checkpoint files.

Every checkpoint is written to a temporary file *in the destination directory* (never the system
temporary directory, which is often another filesystem where a "move" becomes a copy), flushed
and ``fsync``'ed, atomically renamed over the destination with ``os.replace``, and the directory
is ``fsync``'ed. A reader therefore sees either the previous complete file or the new complete
file, whatever moment the process dies at. A failed write (disk full, permission denied) removes
its own partial file, keeps every earlier checkpoint and raises :class:`CheckpointWriteError`
naming the path and the cause. A checkpoint whose weights hold NaN/Inf is never written
(:class:`SafeCheckpointIO` refuses it), so it can never replace a good one.

A process killed by SIGKILL in the middle of a write cannot clean up after itself: its temporary
file (``.<name>.tmp-<pid>-<random>``) is removed by :func:`remove_stale_temp_files`, which
``fit`` calls when a run starts or resumes.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from dinokit import atomic
from dinokit.atomic import TEMP_MARK, fsync_dir, temp_name, writer_alive
from dinokit.weights import load_failure


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; earlier checkpoints are intact."""

    exit_code = 74  # sysexits EX_IOERR

    def __init__(self, path: str | Path, cause: BaseException):
        self.path, self.cause = Path(path), cause
        reason = atomic.reason(cause)  # torch reports ENOSPC as "[enforce fail at inline_container.cc]"
        super().__init__(f"could not write checkpoint {self.path}: {reason}; the earlier checkpoints "
                         f"in {self.path.parent} are intact")


class CheckpointReadError(ValueError):
    """A checkpoint file that does not load or whose weights are not finite."""


#: Errors of reading a file that say nothing about its content (permissions, a failing disk, a
#: stale or unreachable network file), unlike torch's own (a truncated zip fails with EINVAL).
UNREADABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.ENXIO, errno.ESTALE,
                               errno.ETIMEDOUT})


class CheckpointUnreadableError(CheckpointReadError):
    """A checkpoint that could not be read at all (permissions, an I/O error): unlike a damaged
    file it may hold the newest state, so a resume must not skip it."""


def _write(obj: Any, f: Any) -> None:
    """Serialise ``obj`` into the open file ``f`` (a separate function so tests can fail it)."""
    torch.save(obj, f)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file under ``path`` or beside it.

    Raises :class:`CheckpointWriteError` (an ``OSError``) naming ``path`` and the cause.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointWriteError(path, e) from e
    if path.parent.exists() and not path.parent.is_dir():  # pragma: no cover - mkdir raises first
        raise CheckpointWriteError(path, NotADirectoryError(f"{path.parent} is not a directory"))
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            _write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also KeyboardInterrupt: never leave the temp file
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports write errors as RuntimeError
            raise CheckpointWriteError(path, e) from e
        raise
    fsync_dir(path.parent)


def is_first_process() -> bool:
    """Whether this is global rank 0 as far as the launcher's environment tells (torchrun,
    SLURM, Lightning's own launcher); a single process is rank 0."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) == 0
    return all(os.environ.get(v, "0") in ("", "0") for v in ("LOCAL_RANK", "NODE_RANK"))


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary files left in ``directory`` by writers that were killed; returns them.

    Only the first process of a run cleans, and never a file whose writer is still running.
    """
    d = Path(directory)
    if not d.is_dir() or not is_first_process():
        return []
    gone = []
    for p in d.iterdir():
        if p.name.startswith(".") and TEMP_MARK in p.name and p.is_file() and not writer_alive(p.name):
            try:
                p.unlink()
                gone.append(p)
            except OSError:  # pragma: no cover - a concurrent cleaner
                pass
    return gone


def non_finite_tensors(state: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[str]:
    """Names of floating-point tensors in ``state`` holding NaN or Inf (one host sync per call)."""
    items = state.items() if isinstance(state, Mapping) else state
    names, flags = [], []
    for name, v in items:
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel():
            names.append(name)
            flags.append(torch.isfinite(v).all().reshape(1).to("cpu", non_blocking=False))
    if not flags:
        return []
    ok = torch.cat(flags)
    return [n for n, good in zip(names, ok.tolist()) if not good]


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (``weights_only=True``) and check its weights are finite.

    Returns the loaded dict; raises :class:`CheckpointReadError` saying why it is unusable.
    """
    p = Path(path)
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except OSError as e:
        if e.errno in UNREADABLE_ERRNOS:  # the system refused the read: the content is unknown
            raise CheckpointUnreadableError(f"{p} cannot be read ({e.strerror or e})") from None
        raise CheckpointReadError(f"{p} does not load ({type(e).__name__}: {str(e)[:160]})") from None
    except Exception as e:  # truncated zip, 0-byte file, pickle that is not plain data...
        raise CheckpointReadError(f"{p} does not load ({load_failure(e)})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), Mapping):
        raise CheckpointReadError(f"{p} is not a training checkpoint (no state_dict)")
    bad = non_finite_tensors(obj["state_dict"])
    if bad:
        raise CheckpointReadError(f"{p} holds non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]}")
    return obj


def checkpoint_step(obj: Mapping[str, Any]) -> int:
    """The optimiser step a loaded checkpoint was taken at (-1 when unknown)."""
    step = obj.get("global_step")
    return int(step) if isinstance(step, (int, float)) and math.isfinite(step) else -1


def newest_good_checkpoint(candidates: Iterable[str | Path], skip_unreadable: bool = False
                           ) -> tuple[Path | None, list[str]]:
    """The most recently written candidate that loads with finite weights, and one line per
    newer candidate that was skipped (saying why).

    A damaged candidate is skipped; one that cannot be read at all raises
    :class:`CheckpointUnreadableError` unless ``skip_unreadable``: what it holds is unknown, and a
    run resumed from an older file would overwrite it.
    """
    files = [Path(c) for c in candidates if Path(c).is_file() and TEMP_MARK not in Path(c).name]
    files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)
    skipped: list[str] = []
    for p in files:
        try:
            verify_checkpoint(p)
        except CheckpointUnreadableError as e:
            if not skip_unreadable:
                raise
            skipped.append(str(e))
            continue
        except CheckpointReadError as e:
            skipped.append(str(e))
            continue
        return p, skipped
    return None, skipped


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every checkpoint file of a run directory (``checkpoints/*.ckpt`` and Lightning's
    ``hpc_ckpt_*.ckpt``)."""
    run = Path(run_dir)
    found = list((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else []
    return found + list(run.glob("hpc_ckpt_*.ckpt"))


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic writes in the destination directory, no write of
    non-finite weights, ``weights_only=True`` reads.

    ``refused`` lists the paths whose save was skipped because the weights were not finite;
    ``written`` the paths written, oldest first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[Path] = []
        self.written: list[Path] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"SafeCheckpointIO does not take storage_options, got {storage_options!r}")
        path = Path(path)
        bad = non_finite_tensors(checkpoint.get("state_dict") or {})
        if bad:
            self.refused.append(path)
            warnings.warn(
                f"not writing checkpoint {path}: {len(bad)} weight tensor(s) hold NaN/Inf (e.g. "
                f"{bad[0]}); the earlier checkpoints are kept", stacklevel=2,
            )
            return
        atomic_save(checkpoint, path)
        self.written = [p for p in self.written if p != path] + [path]

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def remove_checkpoint(self, path: Any) -> None:
        p = Path(path)
        if self.refused:  # a save was refused: keep every good file (top-k counted the refused one)
            return
        if p.is_file() or p.is_symlink():
            p.unlink()
        self.written = [q for q in self.written if q != p]

    def newest_finite(self) -> Path | None:
        """The newest checkpoint this run wrote that still exists."""
        for p in reversed(self.written):
            if p.is_file():
                return p
        return None
