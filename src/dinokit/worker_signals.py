"""Loader workers and the stop signals: what a scheduler (``scancel``, a time limit) and a terminal
(Ctrl-C) send to a whole process group must reach the main process only, which holds the model and
turns them into a checkpoint (:mod:`dinokit.train.preemption`)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

#: What a scheduler (``scancel``, a time limit) and a terminal (Ctrl-C) send to a whole process group.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class IgnoreStopSignals:
    """A loader ``worker_init_fn``: ignore SIGINT and SIGTERM, then run ``chained`` (if any).

    Those signals reach the whole process group, workers included. The main process turns them
    into a checkpoint at the end of the current step (:mod:`dinokit.train.preemption`); a worker
    that died of them would make the main process raise "DataLoader worker ... killed by signal"
    in the middle of that step or of the checkpoint's save. An ignoring worker lives until the
    main process shuts the loader down, and exits by itself if the main process dies (torch's
    worker watchdog). Workers start with the signals blocked (:func:`stop_signals_blocked`), so
    one arriving before this function runs is discarded when it sets the disposition.
    """

    def __init__(self, chained: Callable[[int], Any] | None = None):
        self.chained = chained

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if hasattr(signal, "pthread_sigmask"):  # POSIX
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if self.chained is not None:
            self.chained(worker_id)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread within the block: processes started there (loader
    workers) inherit the mask; this thread gets a signal that arrived meanwhile when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: workers may die of a signal at start-up
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
