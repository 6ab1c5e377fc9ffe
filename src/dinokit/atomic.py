"""Crash-safe output files and folders: a reader sees the old complete output or the new one.

Every file dinokit writes for a user (embeddings, exports, shards and their index, configs,
evaluation results, pictures) is written to a temporary name *beside* its destination (the same
folder, so the rename never becomes a copy across filesystems), flushed and ``fsync``'ed, given
the mode an ordinary ``open`` would give it (``0o666`` less the umask; some writers, such as
``safetensors``, create private ``0o600`` files), then renamed over the destination with
``os.replace`` and the folder is ``fsync``'ed. A process killed at any moment, or a disk that
fills up half way, therefore never leaves a truncated file under the final name, and an earlier
output stays intact until the new one is complete.

* :func:`atomic_path` yields a temporary path for writers that need a path;
  :func:`atomic_write` yields an open file; :func:`write_text` / :func:`write_bytes` write a
  string or bytes; :func:`atomic_paths` commits several files together, after all are written.
* :func:`atomic_folder` yields a temporary sibling folder to fill; once complete it takes the
  final name. An existing folder under that name is replaced only when ``replace`` allows it,
  with one ``renameat2(RENAME_EXCHANGE)`` on Linux (an atomic swap), else two renames (the final
  name is then missing for an instant, but never half-written).

A failed write removes its temporary file and raises :class:`OutputWriteError` naming the
destination and the cause (``No space left on device``). A writer killed by SIGKILL cannot
clean up: its temporary file (``.<name>.tmp-<pid>-<random>``, hidden) is removed by the next
write to the same destination once that process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

TEMP_MARK = ".tmp-"


class OutputWriteError(OSError):
    """An output could not be written; an earlier file under the same name is intact."""

    exit_code = 74  # sysexits EX_IOERR, as for checkpoints

    def __init__(self, path: str | Path, cause: BaseException):
        self.path, self.cause = Path(path), cause
        super().__init__(getattr(cause, "errno", None), f"could not write {self.path}: {reason(cause)}; "
                         "an earlier file of that name is intact")

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def reason(e: BaseException) -> str:
    """The cause of a failed write in words: the OS error behind it when there is one (torch's
    zip writer reports ``ENOSPC`` as ``[enforce fail at inline_container.cc]``, with the
    ``OSError`` as its context)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror
        cur = cur.__cause__ or cur.__context__
    return str(e).strip() or type(e).__name__


def umask() -> int:
    """The process umask, read without changing it where the system allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # pragma: no cover - systems without /proc: read it by setting it
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def temp_name(path: Path) -> Path:
    """A hidden temporary name beside ``path``, marked with this process's id."""
    return path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. directories on some network filesystems
        pass
    finally:
        os.close(fd)


def writer_alive(name: str) -> bool:
    """Whether the local process named in a temporary file's name still runs."""
    try:
        pid = int(name.split(TEMP_MARK, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    return True


def remove_stale(path: Path) -> None:
    """Remove the temporary files and folders killed writers left for ``path``."""
    prefix, stale = f".{path.name}{TEMP_MARK}", []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        stale = [e.path for e in entries if e.name.startswith(prefix) and not writer_alive(e.name)]
    for p in stale:
        _discard(Path(p))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()


def _prepare(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(path, e) from e
    if path.is_dir():
        raise OutputWriteError(path, IsADirectoryError(f"{path} is a folder"))
    remove_stale(path)


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | Path]) -> Iterator[list[Path]]:
    """Temporary paths beside ``paths`` for writers to fill; when the block ends without an
    error, each is synced, given the umask's mode and renamed to its destination, in order.

    On an error every temporary file is removed, the destinations are untouched and an
    ``OSError`` becomes :class:`OutputWriteError` naming the destination.
    """
    dests = [Path(p) for p in paths]
    for d in dests:
        _prepare(d)
    tmps = [temp_name(d) for d in dests]
    mode = 0o666 & ~umask()
    current = dests[0] if dests else Path()
    try:
        yield tmps
        for tmp, dest in zip(tmps, dests):
            current = dest
            _fsync_file(tmp)
            os.chmod(tmp, mode)
        for tmp, dest in zip(tmps, dests):
            current = dest
            os.replace(tmp, dest)
    except BaseException as e:  # also KeyboardInterrupt: never leave a temporary file
        for tmp in tmps:
            _discard(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputWriteError):
            raise OutputWriteError(current, e) from e
        raise
    for d in {d.parent for d in dests}:
        fsync_dir(d)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; the file written there replaces ``path`` when the
    block ends without an error (see :func:`atomic_paths`)."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` whose content replaces ``path`` only once completely written."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write writes a new file: mode must start with 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        try:
            with open(tmp, mode.replace("w", "x", 1), **open_kwargs) as f:
                yield f
                f.flush()
        except OSError:
            raise
        except Exception as e:  # writers report a failed write as their own error type
            cause = next((c for c in (e.__cause__, e.__context__) if isinstance(c, OSError)), None)
            if cause is not None:
                raise OutputWriteError(path, cause) from e
            raise


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


# ------------------------------------------------------------------------------------- folders
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """A temporary sibling folder of ``path`` to fill; it takes the name ``path`` when the block
    ends without an error, and is removed otherwise.

    An existing folder ``path`` is swapped out and deleted after the new one is in place when
    ``replace`` is true; with ``replace=False`` it raises ``FileExistsError`` before anything
    is written. An existing file ``path`` is never replaced.
    """
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    if dest.is_dir() and not replace:
        raise FileExistsError(f"{dest} already exists")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(dest, e) from e
    remove_stale(dest)
    tmp = temp_name(dest)
    try:
        tmp.mkdir(mode=0o777)  # the umask applies, as for any folder
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
                f.chmod(0o666 & ~umask())
        fsync_dir(tmp)
        if dest.is_dir() and _exchange(tmp, dest):
            pass  # tmp now holds the old folder
        elif dest.is_dir():
            old = temp_name(dest)
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except OSError:
                os.rename(old, dest)  # put the earlier folder back
                raise
            tmp = old
        else:
            os.rename(tmp, dest)
    except BaseException as e:
        _discard(tmp)
        if isinstance(e, OSError) and not isinstance(e, (OutputWriteError, FileExistsError)):
            raise OutputWriteError(dest, e) from e
        raise
    _discard(tmp)  # the replaced folder, if any
    fsync_dir(dest.parent)
