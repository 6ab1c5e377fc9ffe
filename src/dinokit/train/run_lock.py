"""One training at a time in a run directory.

Two ``dinokit train`` writing into the same run directory would both write ``last.ckpt`` and
interleave ``metrics.csv``. While a run trains it holds ``<run>/train.lock``:

* the file holds ``<pid> <host>`` and is created atomically: written under a temporary name, then
  hard-linked to ``train.lock`` (``os.link`` fails when the lock exists), so no reader sees it
  half-written and of two runs starting together exactly one creates it;
* the holder keeps an exclusive ``flock`` on it until the run ends. The kernel drops that lock
  when the process dies, even by SIGKILL, so a lock file nobody holds is stale: the next run
  takes it over with a warning naming the dead PID. A held lock makes the second run fail with
  one line naming the holder's PID and host (exit code 2);
* the file is removed on every exit path of the run (:class:`RunLock` is a context manager).

Only the first process of a multi-process run locks: the others train in the same run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import warnings
from pathlib import Path
from types import TracebackType

from dinokit.config import ConfigError
from dinokit.train.checkpoint_io import TEMP_MARK, is_first_process

LOCK_NAME = "train.lock"


class RunDirectoryLockedError(ConfigError):
    """Another live process is training in the run directory."""


def _owner() -> str:
    return f"{os.getpid()} {socket.gethostname()}"


def _parse(owner: str) -> tuple[int | None, str]:
    pid, _, host = owner.strip().partition(" ")
    return (int(pid) if pid.isdigit() else None), host


def _alive_here(owner: str) -> bool:
    """Whether ``owner`` is a running process of this host (another host's cannot be checked)."""
    pid, host = _parse(owner)
    if pid is None or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


class RunLock:
    """Hold ``<run_dir>/train.lock`` within a ``with`` block (see the module docstring).

    Raises :class:`RunDirectoryLockedError` (a :class:`~dinokit.config.ConfigError`) when another
    live process holds it, and ``ConfigError`` when the run directory cannot be created.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created = False  # the run directory was made for this lock (removed again if left empty)

    def __enter__(self) -> RunLock:
        if is_first_process():
            self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def _refuse(self, holder: str) -> RunDirectoryLockedError:
        pid, host = _parse(holder)
        who = f"PID {pid}" + (f" on {host}" if host else "") if pid is not None else "another process"
        return RunDirectoryLockedError(
            f"trainer.run_name: {self.run_dir} is in use by another training ({who}, lock file "
            f"{self.path}); wait for it to end or choose another trainer.run_name")

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirectoryLockedError`."""
        owner = _owner()
        tmp = self.run_dir / f".{LOCK_NAME}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"trainer.output_dir: {self.run_dir} exists and is not a directory") from None
        except OSError as e:
            raise ConfigError(f"trainer.output_dir: cannot create {self.run_dir}: {e.strerror or e}"
                              ) from None
        try:
            for _ in range(10):  # each turn ends with the lock held, a refusal, or a file replaced
                if not tmp.exists():  # the complete content, under a name nobody else uses
                    self._write(tmp, owner)
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    pass
                except OSError as e:  # a filesystem without hard links: train unlocked, say so
                    warnings.warn(f"cannot lock the run directory {self.run_dir} ({e.strerror or e}): "
                                  "a second training into it would not be refused", stacklevel=3)
                    return
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # its holder released it meanwhile
                    continue
                if not self._lock_or_close(fd, owner, tmp):
                    continue
                self._fd = fd
                return
            raise self._refuse("")  # pragma: no cover - a lock file changing hands ten times
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _write(self, tmp: Path, owner: str) -> None:
        try:
            with open(tmp, "w") as f:
                f.write(owner + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise ConfigError(f"trainer.output_dir: cannot write in {self.run_dir}: {e.strerror or e}"
                              ) from None

    def _lock_or_close(self, fd: int, owner: str, tmp: Path) -> bool:
        """With ``fd`` open on the lock file: True when this process now holds it; False (``fd``
        closed) when the file changed meanwhile and the caller should look again."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise self._refuse(holder) from None
        except OSError:  # no flock on this filesystem: a live process of this host is a holder
            holder = _read(fd)
            pid, host = _parse(holder)
            if holder != owner and (_alive_here(holder) or host != socket.gethostname()):
                os.close(fd)
                raise self._refuse(holder) from None
        if not _same_file(fd, self.path):  # replaced or removed between open and flock
            os.close(fd)
            return False
        holder = _read(fd)
        if holder == owner:
            return True
        if _alive_here(holder):  # between its link and its flock
            os.close(fd)
            raise self._refuse(holder)
        pid, host = _parse(holder)
        warnings.warn(f"taking over the stale lock {self.path} of PID {pid} on {host or '?'}: that "
                      "process is no longer running", stacklevel=4)
        os.replace(tmp, self.path)  # our content, atomically; flock it on the next turn
        os.close(fd)
        return False

    def release(self) -> None:
        """Remove the lock file (if it is still this process's) and drop the lock."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path) and _read(self._fd) == _owner():
                self.path.unlink()
        except OSError:  # pragma: no cover - a run directory removed under the run
            pass
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created:  # e.g. trainer.resume=last into a run that does not exist
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()
