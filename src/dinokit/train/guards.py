"""Collapse guard: a run whose teacher has collapsed is never reported healthy.

DINO's two failure modes (Caron et al. 2021, sec. 5.3) show in the teacher's output
distribution over the ``K`` prototypes:

* **uniform collapse**: every image gets the flat distribution; the teacher entropy and the
  cross-entropy loss sit at ``ln K`` and the mean distribution is uniform (KL to uniform ~ 0);
* **one-prototype collapse**: one prototype wins for every image; the entropy goes to 0 and the
  KL of the mean distribution to uniform goes to ``ln K``.

:class:`CollapseGuard` reads ``train/teacher_entropy``, ``train/teacher_kl_uniform`` and the
DINO loss (``train/loss_cls`` when logged, else ``train/loss``) at logging steps only (they are
device tensors; reading them is the one host sync, which logging does anyway). When the reading
stays collapsed for ``window`` optimiser steps it warns once, naming the symptom and the usual
remedies; with ``stop=True`` it raises :class:`CollapseDetected` (the CLI exits with code 3).
Its :attr:`status` is one line for the run's final summary, which says what the last reading
shows: a collapse is named there even when it lasted less than the window (the window decides
when to warn or stop, not what the summary says).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from dinokit.losses.dino import collapse_status

REMEDIES = (
    "usual remedies: a lower teacher temperature (teacher.temperature, "
    "teacher.warmup_temperature), a higher centring momentum (teacher.center_momentum), a "
    "slower EMA teacher (teacher.momentum closer to 1), a larger batch (data.batch_size), "
    "a lower learning rate (optim.lr)"
)


class CollapseDetected(RuntimeError):  # noqa: N818 - names the event, like Preempted
    """The teacher stayed collapsed for the configured window (``trainer.stop_on_collapse``)."""

    exit_code = 3


def _read(metrics: dict[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class CollapseGuard(pl.Callback):
    """Watch the teacher distribution for collapse (see the module docstring).

    Args:
        n_prototypes: ``K`` of the CLS head.
        window: optimiser steps the collapse must persist before it is reported.
        stop: raise :class:`CollapseDetected` when it is reported.
        every_n_steps: how often to read the metrics (the logging interval).
    """

    def __init__(self, n_prototypes: int, window: int = 500, stop: bool = False, every_n_steps: int = 10):
        if n_prototypes < 2 or window < 1 or every_n_steps < 1:
            raise ValueError("n_prototypes must be >= 2, window and every_n_steps >= 1")
        self.n_prototypes, self.window, self.stop = n_prototypes, window, stop
        self.every_n_steps = every_n_steps
        self.symptom: str | None = None  # the symptom seen now (None = healthy or unknown)
        self.since: int | None = None  # first step of the current collapsed stretch
        self.reported: str | None = None  # the warning given, if any
        self.last_reading: dict[str, float] = {}

    @property
    def status(self) -> str:
        """One line for the final summary."""
        if self.reported:
            return f"collapse check: {self.reported}"
        if not self.last_reading:
            return "collapse check: no teacher diagnostics were logged"
        r = self.last_reading
        if self.symptom:  # collapsed at the end, for less than the window: no warning was given
            return (f"collapse check: {self._describe(self.symptom, self.since or 0, r['entropy'], r['kl'])}"
                    f"; shorter than trainer.collapse_window ({self.window} steps), so not warned")
        ln_k = math.log(self.n_prototypes)
        if collapse_status(ln_k, r["entropy"], r["kl"], self.n_prototypes) != "ok":
            # the teacher reads as uniform collapse; only the loss is not pinned at ln K (yet)
            return (f"collapse check: the teacher is flat, as in uniform collapse (teacher entropy "
                    f"{r['entropy']:.3f} nats, KL of the mean to uniform {r['kl']:.4f}, ln K = {ln_k:.3f}); "
                    "the loss is not pinned at ln K yet")
        return (f"collapse check: ok (teacher entropy {r['entropy']:.3f} nats, KL to uniform "
                f"{r['kl']:.3f}, ln K = {ln_k:.3f})")

    def _describe(self, state: str, since: int, entropy: float, kl_uniform: float) -> str:
        return (f"{state} since step {since} (teacher entropy {entropy:.3f} nats, KL of the mean "
                f"to uniform {kl_uniform:.4f}, ln K = {math.log(self.n_prototypes):.3f})")

    def observe(self, step: int, loss: float, entropy: float, kl_uniform: float) -> str | None:
        """Feed one reading; returns the warning text the first time the collapse is confirmed."""
        self.last_reading = {"loss": loss, "entropy": entropy, "kl": kl_uniform}
        if not all(math.isfinite(x) for x in (loss, entropy, kl_uniform)):
            return None  # the non-finite guard reports these
        state = collapse_status(loss, entropy, kl_uniform, self.n_prototypes)
        if state == "ok":
            self.symptom, self.since = None, None
            return None
        if state != self.symptom:
            self.symptom, self.since = state, step
        if self.reported or step - (self.since or 0) < self.window:
            return None
        self.reported = self._describe(state, self.since or 0, entropy, kl_uniform)
        return f"the teacher has collapsed: {self.reported}; {REMEDIES}"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        m = trainer.callback_metrics
        entropy, kl = _read(m, "train/teacher_entropy"), _read(m, "train/teacher_kl_uniform")
        loss = _read(m, "train/loss_cls")
        if loss is None:
            loss = _read(m, "train/loss")
        if entropy is None or kl is None or loss is None:
            return
        message = self.observe(step, loss, entropy, kl)
        if message is None:
            return
        if self.stop:
            raise CollapseDetected(message + " (stopped: trainer.stop_on_collapse=true)")
        warnings.warn(message, stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {"symptom": self.symptom, "since": self.since, "reported": self.reported}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.symptom = state_dict.get("symptom")
        self.since = state_dict.get("since")
        self.reported = state_dict.get("reported")


class NonFiniteStopCheckpoint(pl.Callback):
    """Write ``last.ckpt`` before the non-finite guard stops the run.

    The guard (:meth:`~dinokit.train.step.TrainingStep.check_nonfinite`) stops after
    ``trainer.max_nonfinite_steps`` consecutive non-finite steps, each of which was skipped on the
    device: the weights, EMA teacher, centre and optimiser state are still those of the last finite
    step. The module raises the stop at the end of the step (``pending_stop``); this callback runs
    first and saves that state, so the run keeps its progress since the last periodic checkpoint
    (a save that fails, or weights that are somehow not finite, leave the earlier files as they are).

    Args:
        last_path: where to write the checkpoint (``checkpoints/last.ckpt``).
    """

    def __init__(self, last_path: str | Path):
        self.last_path = Path(last_path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        stop = getattr(pl_module, "pending_stop", None)
        if stop is None:
            return
        pl_module.pending_stop = None
        try:
            trainer.save_checkpoint(str(self.last_path), weights_only=False)
        except OSError as e:
            warnings.warn(str(e), stacklevel=2)
        raise stop
