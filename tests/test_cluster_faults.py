"""Fault injection as on a cluster: signals to the whole process group while loader workers run,
Ctrl-C, a checkpoint that cannot be read, two trainings in one run directory, a collapsed teacher
stopped before the collapse window, and the non-finite guard's stop. Real CPU training runs (a
tiny ViT on 192 digits, 6 steps per epoch), in a subprocess where the fault must hit a process.

Exit codes of ``dinokit``: 0 done, 2 user error, 3 stopped by a guard, 75 pre-empted after
checkpointing, 130 interrupted (Ctrl-C) after checkpointing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.train import checkpoint_io
from test_faults import COLLAPSE, REPO, _args, _assert_same_weights, _state

#: Runs ``dinokit`` and, at optimiser step ``DK_AT``, writes ``DK_MARKER`` (the PID) and waits in
#: the step's end until a signal has been received or ``DK_RELEASE`` exists: the test then sends
#: its signal, or starts a second training, while this one is known to be mid-run. After a signal
#: the step goes on for another half second, time for loader workers to die of it if they do.
PAUSE_AT_STEP = """
import os, sys, time
from pathlib import Path
from dinokit.train.preemption import PreemptionCallback
real = PreemptionCallback.on_train_batch_end
marker, release = Path(os.environ["DK_MARKER"]), Path(os.environ.get("DK_RELEASE", "/nonexistent"))
def pause(self, trainer, *a, **k):
    if trainer.global_step == int(os.environ["DK_AT"]) and not marker.exists():
        marker.write_text(str(os.getpid()))
        deadline = time.time() + 60
        while self.received is None and not release.exists() and time.time() < deadline:
            time.sleep(0.01)
        if self.received is not None:
            time.sleep(0.5)
    return real(self, trainer, *a, **k)
PreemptionCallback.on_train_batch_end = pause
from dinokit.cli import main
sys.exit(main(sys.argv[1:]))
"""

DROP_PATH = "backbone.drop_path_rate=0.1"  # the resume must restore the RNG too


def _start(argv: list[str], marker: Path, at: int = 3, release: Path | None = None,
           **popen: object) -> subprocess.Popen:
    """Start ``dinokit`` paused at step ``at`` in a new session (its own process group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "DK_MARKER": str(marker),
           "DK_AT": str(at), "DK_RELEASE": str(release or "/nonexistent")}
    return subprocess.Popen([sys.executable, "-c", PAUSE_AT_STEP, *argv], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the run ended before step {marker.name}: rc {proc.returncode}\n{err[-3000:]}")
        time.sleep(0.02)


def _quiet_main(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(argv)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """``last.ckpt`` of the 12-step run never interrupted (the crops do not depend on the workers)."""
    root = tmp_path_factory.mktemp("ref")
    assert _quiet_main(_args(root, "ref", DROP_PATH)) == 0
    return root / "ref" / "checkpoints" / "last.ckpt"


# --------------------------------------------------------------------------- signals
@pytest.mark.slow  # seven interrupted runs, each resumed
@pytest.mark.parametrize(("name", "workers", "to_group"), [
    ("SIGTERM", 0, True), ("SIGTERM", 1, True), ("SIGTERM", 2, True),
    ("SIGINT", 0, True), ("SIGINT", 1, True), ("SIGINT", 2, True), ("SIGINT", 2, False),
])
def test_signal_mid_run_saves_the_last_step_and_resume_matches_uninterrupted(tmp_path, uninterrupted, name,
                                                                              workers, to_group):
    """``scancel``, a time limit and a terminal's Ctrl-C signal the whole process group, loader
    workers included: the main process still saves step 3 and exits 75 (SIGTERM) or 130 (SIGINT)
    with one line; ``resume=auto`` then ends on the weights of the uninterrupted run."""
    args = _args(tmp_path, "r", DROP_PATH, f"data.num_workers={workers}")
    marker = tmp_path / "at-step-3"
    proc = _start(args, marker)
    _wait_for(marker, proc)
    sig = getattr(signal, name)
    os.killpg(proc.pid, sig) if to_group else os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (75 if name == "SIGTERM" else 130), err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("dinokit train:")]
    assert len(lines) == 1 and f"stopped by {name} after step 3" in lines[0] and "last.ckpt" in lines[0], err
    for noise in ("Traceback", "KeyboardInterrupt", "killed by signal", "could not write"):
        assert noise not in err, err[-3000:]
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    assert _state(last)["global_step"] == 3
    assert not (tmp_path / "r" / "train.lock").exists()  # released on this exit path too
    assert _quiet_main([*args, "trainer.resume=auto"]) == 0
    _assert_same_weights(last, uninterrupted)


def test_ctrl_c_before_training_starts_exits_130_without_lightning_noise(tmp_path):
    """Ctrl-C while Lightning sets up (here: restoring the checkpoint): there is no step to save;
    exit 130 at once with one line, never Lightning's "Detected KeyboardInterrupt" and exit 1."""
    assert _quiet_main(_args(tmp_path, "r", "trainer.epochs=1")) == 0
    script = PAUSE_AT_STEP.replace("from dinokit.train.preemption", """
import signal
from dinokit.train.module import DINOModule
def ctrl_c(self, checkpoint):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
DINOModule.on_load_checkpoint = ctrl_c
from dinokit.train.preemption""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "DK_MARKER": "/nonexistent", "DK_AT": "-1"}
    done = subprocess.run([sys.executable, "-c", script, *_args(tmp_path, "r", "trainer.resume=auto")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 130, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("dinokit train:")]
    assert len(lines) == 1 and "SIGINT before training started" in lines[0], done.stderr
    assert "Detected KeyboardInterrupt" not in done.stderr and "Traceback" not in done.stderr
    assert _state(tmp_path / "r" / "checkpoints" / "last.ckpt")["global_step"] == 6  # untouched


# --------------------------------------------------------------------------- unreadable checkpoint
def _finished_run_with_only_last_ckpt(root: Path) -> Path:
    assert _quiet_main(_args(root, "u", "trainer.epochs=1")) == 0
    ckpts = root / "u" / "checkpoints"
    for p in ckpts.glob("epoch*.ckpt"):
        p.unlink()
    return ckpts / "last.ckpt"


def _obey_file_modes() -> None:
    """``preexec_fn`` for root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability
    bounding set, so the program then executed (still uid 0) obeys file modes like any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_resume_auto_refuses_to_start_over_an_unreadable_checkpoint(tmp_path):
    """An intact ``last.ckpt`` that cannot be read (mode 000) is not a damaged one: ``auto`` must
    neither skip it nor start fresh and overwrite it. Root reads any file, so a root test process
    runs the training without the capabilities that override file modes."""
    last = _finished_run_with_only_last_ckpt(tmp_path)
    metrics = tmp_path / "u" / "logs" / "metrics.csv"
    before = (last.read_bytes(), last.stat().st_mtime_ns, metrics.read_bytes())
    last.chmod(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from dinokit.cli import main; sys.exit(main(sys.argv[1:]))",
             *_args(tmp_path, "u", "trainer.epochs=2", "trainer.resume=auto")], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=240,
            preexec_fn=_obey_file_modes if os.geteuid() == 0 else None)
    finally:
        last.chmod(0o644)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("dinokit train: error:")]
    assert len(errors) == 1 and f"{last} cannot be read (Permission denied)" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "skipping damaged" not in done.stderr
    assert (last.read_bytes(), last.stat().st_mtime_ns, metrics.read_bytes()) == before  # untouched
    assert not (tmp_path / "u" / "train.lock").exists()


def test_unreadable_checkpoint_is_not_skipped_but_a_damaged_one_is(tmp_path, monkeypatch, capsys):
    """The same rule in-process (whoever runs the tests): a read that fails with an OSError stops
    ``auto`` and ``last`` with one line; a truncated file is still skipped."""
    last = _finished_run_with_only_last_ckpt(tmp_path)
    real = torch.load

    def load(path, *a, **k):
        if str(path) == str(last):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(torch, "load", load)
    for mode in ("auto", "last"):
        assert _quiet_main(_args(tmp_path, "u", "trainer.epochs=2", f"trainer.resume={mode}")) == 2
        err = capsys.readouterr().err
        assert f"{last} cannot be read (Permission denied)" in err and err.count("\n") == 1
    monkeypatch.setattr(torch, "load", real)
    assert _state(last)["global_step"] == 6
    last.write_bytes(last.read_bytes()[:5000])  # a torn file: skipped, and nothing else is there
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert main(_args(tmp_path, "u", "trainer.epochs=1", "trainer.resume=auto")) == 0


# --------------------------------------------------------------------------- run directory lock
def test_a_second_training_into_a_running_run_directory_fails_naming_the_holder(tmp_path, capsys):
    args = _args(tmp_path, "busy", "data.num_workers=1")
    marker, release = tmp_path / "at-step-1", tmp_path / "release"
    first = _start(args, marker, at=1, release=release)
    try:
        _wait_for(marker, first)
        assert (tmp_path / "busy" / "train.lock").read_text().split()[0] == str(first.pid)
        for extra in ([], ["trainer.resume=auto"]):
            assert main([*args, *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"in use by another training (PID {first.pid}" in err, err
    finally:
        release.touch()
        _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-3000:]
    assert _state(tmp_path / "busy" / "checkpoints" / "last.ckpt")["global_step"] == 12  # not disturbed
    assert not (tmp_path / "busy" / "train.lock").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "stale"
    run.mkdir()
    (run / "train.lock").write_text(f"{dead.pid} {socket.gethostname()}\n")  # a run killed by SIGKILL
    with pytest.warns(UserWarning, match=f"stale lock .*train.lock of PID {dead.pid}"):
        assert main(_args(tmp_path, "stale", "trainer.epochs=1")) == 0
    assert not (run / "train.lock").exists()


# --------------------------------------------------------------------------- collapse summary
ONE_PROTOTYPE = ["teacher.temperature=0.0001", "teacher.warmup_temperature=0.0001",
                 "teacher.center_momentum=1.0", "trainer.epochs=1",  # no centring, argmax targets
                 "backbone.init=timm"]  # timm's small-scale start collapses onto one prototype at once


@pytest.mark.parametrize(("config", "symptom"), [
    (COLLAPSE, "uniform collapse"),
    (ONE_PROTOTYPE, "one-prototype collapse"),
    (["teacher.temperature=50", "teacher.warmup_temperature=50", "trainer.epochs=1"],
     "the teacher is flat, as in uniform collapse"),
])
def test_collapse_summary_names_the_collapse_before_and_after_the_window(tmp_path, capsys, config, symptom):
    """The window decides when to warn or stop, not what the summary says about the last reading."""
    for window, warned in ((1000, False), (3, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(_args(tmp_path, f"w{window}", *config, f"trainer.collapse_window={window}")) == 0
        out = capsys.readouterr().out
        summary = next(ln for ln in out.splitlines() if ln.startswith("collapse check:"))
        assert summary.startswith(f"collapse check: {symptom}") and "ok" not in summary.split("(")[0], summary
        flat_teacher_only = symptom.startswith("the teacher is flat")
        assert any("has collapsed" in str(w.message) for w in caught) == (warned and not flat_teacher_only)
        if not warned:
            assert "not warned" in summary or flat_teacher_only


# --------------------------------------------------------------------------- non-finite stop
NAN_AT_STEP_4 = """
import sys, torch
from dinokit.train.step import TrainingStep
real = TrainingStep.forward
def forward(self, batch, *args, **kwargs):
    out = real(self, batch, *args, **kwargs)
    if self.method.training and getattr(self, "_calls", 0) >= 4:  # steps 5, 6, 7...: NaN loss
        out.loss = out.loss * float("nan")
    self._calls = getattr(self, "_calls", 0) + 1
    return out
TrainingStep.forward = forward
from dinokit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_non_finite_stop_writes_last_ckpt_with_the_last_finite_state(tmp_path):
    """Three NaN steps in a row stop the run (exit 3); the guard skipped them, so the weights are
    those of step 4: ``last.ckpt`` holds them (finite) and the final line names it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", NAN_AT_STEP_4, *_args(tmp_path, "nan", "data.num_workers=1")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 3, done.stderr[-3000:]
    last = tmp_path / "nan" / "checkpoints" / "last.ckpt"
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("dinokit train: error:")]
    assert len(errors) == 1 and "3 consecutive training steps" in errors[0], done.stderr
    assert f"newest checkpoint with finite weights: {last}" in errors[0]
    obj = checkpoint_io.verify_checkpoint(last)  # loads, every weight finite
    assert obj["global_step"] == 7 and obj["epoch"] == 1  # steps 5-7 skipped: no update since step 4
