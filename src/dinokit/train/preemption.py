"""Pre-emption and Ctrl-C: SIGTERM / SIGUSR1 / SIGINT end the run at a step boundary with a checkpoint.

Schedulers warn a job before they kill it: SLURM sends SIGUSR1 (with ``--signal=USR1@<secs>``)
and SIGTERM; Kubernetes sends SIGTERM. On either signal the current optimiser step finishes, the
run writes ``checkpoints/last.ckpt`` (atomically), optionally asks SLURM to requeue the job
(``trainer.slurm_requeue=true``, via ``scontrol requeue``), and ``fit`` raises
:class:`Preempted`; the CLI exits with :data:`EXIT_REQUEUE` (75, ``EX_TEMPFAIL``: "temporary
failure, try again"). Resubmitting the same command line with ``trainer.resume=auto`` continues
exactly from that checkpoint.

Ctrl-C (SIGINT) does the same and exits with :data:`EXIT_INTERRUPTED` (130, the shell's code for
SIGINT) without requeueing; a second Ctrl-C stops at once (the checkpoint being written, if any, is
abandoned: checkpoint files are atomic, so the previous one stays). Before training starts (set-up,
restoring a checkpoint) there is no step to save: Ctrl-C stops at once.

The signals reach the whole process group (``scancel``, a time limit, a terminal's Ctrl-C), so the
loader workers get them too: they ignore them (:class:`~dinokit.train.loader.IgnoreStopSignals`)
and the main process, which holds the model, saves it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl

#: Exit code of a run stopped by a pre-emption signal after checkpointing (sysexits EX_TEMPFAIL).
EXIT_REQUEUE = 75
#: Exit code of a run stopped by Ctrl-C (SIGINT): 128 + 2, as a shell reports it.
EXIT_INTERRUPTED = 130
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class Preempted(Exception):  # noqa: N818 - reads as a state, like StopIteration
    """The run stopped on a pre-emption signal after writing ``checkpoint``."""

    exit_code = EXIT_REQUEUE

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, requeued: bool):
        self.signal_name, self.step, self.checkpoint, self.requeued = signal_name, step, checkpoint, requeued
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (the save failed)"
        again = ("the job was requeued" if requeued
                 else "resubmit the same command with trainer.resume=auto to continue")
        super().__init__(f"stopped by {signal_name} after step {step}; {where}; {again}")


class Interrupted(Preempted):
    """The run stopped on Ctrl-C (SIGINT), after writing ``checkpoint`` when a step was done."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, requeued: bool = False,
                 reason: str = ""):
        super().__init__(signal_name, step, checkpoint, requeued)
        if reason:  # stopped at once: nothing was written
            self.args = (f"stopped by {signal_name} {reason}; resubmit the same command with "
                         "trainer.resume=auto to continue from the newest checkpoint",)


def slurm_job_id() -> str | None:
    """``SLURM_JOB_ID`` (or ``<array job>_<task>``) when running under SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_requeue() -> bool:
    """Ask SLURM to requeue this job; returns whether ``scontrol requeue`` succeeded."""
    job = slurm_job_id()
    if not job or not re.fullmatch(r"[0-9_]+", job):
        warnings.warn("trainer.slurm_requeue: not running under SLURM (no SLURM_JOB_ID)", stacklevel=2)
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
    except OSError as e:
        warnings.warn(f"could not requeue SLURM job {job}: {e}", stacklevel=2)
        return False
    if done.returncode != 0:
        warnings.warn(f"scontrol requeue {job} failed: {done.stderr.strip()}", stacklevel=2)
    return done.returncode == 0


class PreemptionCallback(pl.Callback):
    """Sets a flag on SIGTERM/SIGUSR1/SIGINT; after the current step it checkpoints and raises
    :class:`Preempted` (:class:`Interrupted` for SIGINT).

    The handlers are installed when training starts (after Lightning's own, which they replace
    for these signals, so neither Lightning's "exit 0 without a checkpoint" on SIGTERM nor its
    "Detected KeyboardInterrupt" exit 1 on Ctrl-C runs) and Lightning restores the previous
    handlers at teardown. :meth:`catching_ctrl_c` covers the set-up before that: Ctrl-C there
    raises :class:`Interrupted` at once. The module needs no hook: the check runs
    in ``on_train_batch_end``, after the optimiser step, EMA and schedules of that batch.

    With several processes the flag is combined over all of them (any process signalled stops
    all, at the same step, so the collective save cannot deadlock) every ``sync_every_n_steps``
    steps, where the logging step synchronises anyway; a single process checks every step.

    Args:
        last_path: where to write the checkpoint (``checkpoints/last.ckpt``).
        requeue: run ``scontrol requeue`` before exiting (SLURM).
        sync_every_n_steps: interval of the cross-process check (multi-process runs only).
    """

    def __init__(self, last_path: str | Path, requeue: bool = False, sync_every_n_steps: int = 10):
        self.last_path = Path(last_path)
        self.requeue = requeue
        self.sync_every_n_steps = max(1, sync_every_n_steps)
        self.received: str | None = None
        self.armed = False  # training has started: a step can be saved
        self.stopping = False  # the stop checkpoint is written: further signals change nothing
        self.step = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stopping:  # the checkpoint is written and the run is ending
            return
        if name == "SIGINT" and not self.armed:
            raise Interrupted(name, self.step, None, reason="before training started")
        if name == "SIGINT" and self.received == "SIGINT":
            raise Interrupted(name, self.step, None, reason=f"twice, before step {self.step + 1} ended")
        if self.received is None:
            self.received = name

    def install(self, names: tuple[str, ...] = SIGNALS) -> None:
        """Install the handlers of ``names`` (main thread only; elsewhere signals cannot be caught)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in names:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._previous.items():
            if signal.getsignal(sig) == self._handler:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous = {}

    @contextlib.contextmanager
    def catching_ctrl_c(self) -> Iterator[None]:
        """Within the block (``Trainer.fit``), Ctrl-C raises :class:`Interrupted` instead of
        ``KeyboardInterrupt``, which Lightning would turn into exit code 1."""
        self.install(("SIGINT",))
        try:
            yield
        finally:
            self.uninstall()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step
        self.install()
        self.armed = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # Accumulating gradients: only stop where an optimiser step just happened.
        settings = getattr(pl_module, "settings", None)
        every = getattr(settings, "accumulate", None) or trainer.accumulate_grad_batches
        if (batch_idx + 1) % every and not trainer.fit_loop.epoch_loop.done:
            return
        self.step = trainer.global_step
        if trainer.world_size > 1:
            if trainer.global_step % self.sync_every_n_steps:
                return
            if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
                return
            self.received = self.received or "SIGTERM (on another process)"
        elif self.received is None:
            return
        saved: Path | None = self.last_path
        try:
            trainer.save_checkpoint(str(self.last_path), weights_only=False)
        except OSError as e:
            warnings.warn(str(e), stacklevel=2)
            saved = None
        io = trainer.strategy.checkpoint_io
        if saved is not None and saved in getattr(io, "refused", []):
            saved = None
        self.stopping = True
        if self.received.startswith("SIGINT"):
            raise Interrupted(self.received, trainer.global_step, saved)
        requeued = bool(self.requeue and trainer.is_global_zero and slurm_requeue())
        raise Preempted(self.received, trainer.global_step, saved, requeued)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.uninstall()
