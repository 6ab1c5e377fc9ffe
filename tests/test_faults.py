"""Fault injection (issue 11): kills during checkpoint writes, SIGTERM, a full disk, a collapsed
teacher, hostile image folders, fuzzed configs and malicious pickles. Tiny CPU runs, seconds each.

Exit codes of ``dinokit``: 0 done, 2 user error, 3 stopped by a guard, 74 checkpoint write
failed, 75 pre-empted after checkpointing.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import step_settings
from dinokit.cli import main
from dinokit.config import ConfigError, all_keys, load_config, read_yaml, set_value
from dinokit.train import checkpoint_io
from dinokit.train.checkpoint_io import SafeCheckpointIO, atomic_save, remove_stale_temp_files

TINY = [
    "data.dataset=digits", "data.limit=192", "data.batch_size=32", "data.num_workers=0",
    "trainer.epochs=2", "trainer.progress=false", "trainer.log_every_n_steps=1",
    "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, in_chans: 1}",
    "dino.n_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
]
REPO = Path(__file__).resolve().parents[1]


def _args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--config", "demo", *TINY, f"trainer.output_dir={tmp_path}", f"trainer.run_name={name}",
            *extra]


def _subprocess(script: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` (Python) in a fresh interpreter with ``argv``; returns the finished process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **(env or {})}
    return subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=240)


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa["global_step"] == sb["global_step"]
    for k, v in sa["state_dict"].items():
        torch.testing.assert_close(v, sb["state_dict"][k], rtol=0, atol=0, msg=f"{k} differs")


# --------------------------------------------------------------------------- atomic writes
def test_sigkill_during_writes_leaves_old_or_new_file_and_temp_files_are_cleaned(tmp_path):
    """A writer killed at random moments: the destination always loads (old or new content);
    the temporary files a SIGKILL leaves are removed by ``remove_stale_temp_files``."""
    path = tmp_path / "last.ckpt"
    big = torch.randn(2_000_000)  # 8 MB: a write takes a few ms
    atomic_save({"v": 0, "x": big}, path)
    rng = random.Random(0)
    for attempt in range(8):
        pid = os.fork()
        if pid == 0:  # the child rewrites the file until it is killed
            try:
                for v in range(1, 10_000):
                    atomic_save({"v": v, "x": big}, path)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        obj = torch.load(path, weights_only=True)  # never partial
        assert torch.equal(obj["x"], big), attempt
        remove_stale_temp_files(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], attempt


def test_atomic_save_uses_the_destination_directory_not_tmpdir(tmp_path, monkeypatch):
    """The temporary file sits beside the destination, so a rename never becomes a copy."""
    monkeypatch.setenv("TMPDIR", "/dev/shm")
    monkeypatch.setattr(tempfile, "tempdir", None)
    seen = []
    real = checkpoint_io._write

    def spy(obj, f):
        seen.append(Path(f.name))
        real(obj, f)

    monkeypatch.setattr(checkpoint_io, "_write", spy)
    atomic_save({"a": torch.ones(2)}, tmp_path / "x.ckpt")
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".x.ckpt.tmp-")
    assert not seen[0].exists() and (tmp_path / "x.ckpt").is_file()


def test_non_finite_weights_never_replace_a_good_checkpoint(tmp_path):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.warns(UserWarning, match="NaN/Inf"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan"), 0.0])}, "global_step": 2},
                           path)
    assert _state(path)["global_step"] == 1 and io.refused == [path] and io.newest_finite() == path


def test_training_killed_at_random_during_saves_resumes_from_a_good_checkpoint(tmp_path):
    """SIGKILL a real run that checkpoints every step (writes dominate its time): every file left
    loads, ``resume=auto`` finishes the run and no temporary file survives."""
    args = _args(tmp_path, "k", "trainer.checkpoint_every_n_steps=1",
                 "heads.hidden_dim=512", "dino.n_prototypes=4096")  # ~10 MB checkpoints
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from dinokit.cli import main; "
                             "sys.exit(main(sys.argv[1:]))", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "k" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpts.glob("step*.ckpt")):
        time.sleep(0.01)
    time.sleep(random.Random(1).uniform(0.0, 0.5))
    proc.kill()
    proc.wait()
    for p in ckpts.glob("*.ckpt"):
        checkpoint_io.verify_checkpoint(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "trainer.resume=auto"]) == 0
    assert _state(ckpts / "last.ckpt")["global_step"] == 12
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]


def test_a_run_going_non_finite_keeps_its_last_finite_checkpoint(tmp_path):
    """Weights poisoned after step 3 of a Lightning run with SafeCheckpointIO: the per-step
    checkpoints from then on are refused and last.ckpt still holds step 2."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from conftest import tiny_vit
    from dinokit import DINO
    from dinokit.train import DINOModule
    from dinokit.train.loader import ResumableDataLoader, SeededViews
    from test_resume import _collate, _views

    class Poison(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    next(pl_module.method.student.parameters()).fill_(float("nan"))

    torch.manual_seed(0)
    method = DINO(tiny_vit(), projector_hidden_dim=32, projector_bottleneck_dim=16, n_prototypes=32)
    data = list(torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    loader = ResumableDataLoader(SeededViews(data, _views, seed=3), batch_size=8, seed=3, collate_fn=_collate)
    io = SafeCheckpointIO()
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, plugins=[io],
                         callbacks=[Poison(), ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1,
                                                              save_last=True, filename="s{step}")])
    with warnings.catch_warnings(), contextlib.suppress(Exception):  # the loss guard may stop the run
        warnings.simplefilter("ignore")
        trainer.fit(DINOModule(method, step_settings(lr=0.01, warmup_epochs=0)), loader)
    assert io.refused and _state(tmp_path / "last.ckpt")["global_step"] == 2  # poisoned before step 3 saved
    for p in tmp_path.glob("*.ckpt"):
        checkpoint_io.verify_checkpoint(p)  # no file with NaN weights exists
    assert io.newest_finite() == tmp_path / "last.ckpt"


# --------------------------------------------------------------------------- disk full
ENOSPC_SCRIPT = """
import errno, sys
from dinokit.train import checkpoint_io
calls = []
real = checkpoint_io._write
def failing(obj, f):
    calls.append(1)
    if len(calls) == 3:  # the third checkpoint: half written, then the disk is full
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    real(obj, f)
checkpoint_io._write = failing
from dinokit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full_keeps_earlier_checkpoints_and_stops_with_one_line(tmp_path):
    assert os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev  # temp dir on another device
    done = _subprocess(ENOSPC_SCRIPT, *_args(tmp_path, "full", "trainer.checkpoint_every_n_steps=2"),
                       env={"TMPDIR": "/dev/shm"})
    assert done.returncode == 74, done.stderr[-2000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("dinokit train: error")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and ".ckpt" in errors[0]
    assert "Traceback" not in done.stderr
    ckpts = tmp_path / "full" / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert all(not n.startswith(".") for n in names), names  # no temp file survives
    for p in ckpts.iterdir():
        checkpoint_io.verify_checkpoint(p)  # every file left loads with finite weights
    assert names  # the checkpoints written before the failure are kept


def test_checkpoints_path_that_is_a_file_fails_before_training(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoints").write_text("not a folder")
    assert main(_args(tmp_path, "r")) == 2
    err = capsys.readouterr().err
    assert "checkpoints" in err and "not a directory" in err and "Traceback" not in err


# --------------------------------------------------------------------------- pre-emption
SIGTERM_SCRIPT = """
import os, signal, sys
from dinokit.train.preemption import PreemptionCallback
real = PreemptionCallback.on_train_batch_end
def hook(self, trainer, *a, **k):
    if trainer.global_step == 3 and self.received is None:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the step, like a scheduler's
    return real(self, trainer, *a, **k)
PreemptionCallback.on_train_batch_end = hook
from dinokit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_mid_epoch_checkpoints_exits_75_and_resume_matches_uninterrupted(tmp_path):
    extra = ("backbone.drop_path_rate=0.1",)
    done = _subprocess(SIGTERM_SCRIPT, *_args(tmp_path, "pre", *extra))
    assert done.returncode == 75, done.stderr[-2000:]
    assert "SIGTERM" in done.stderr and "resume=auto" in done.stderr
    last = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    obj = _state(last)
    assert obj["global_step"] == 3 and obj["epoch"] == 0  # mid-epoch (6 steps per epoch)
    # the same command line, resubmitted with resume=auto, continues to the end
    assert main(_args(tmp_path, "pre", *extra, "trainer.resume=auto")) == 0
    assert main(_args(tmp_path, "ref", *extra)) == 0
    _assert_same_weights(last, tmp_path / "ref" / "checkpoints" / "last.ckpt")


def test_resume_auto_starts_fresh_then_skips_a_damaged_newest_checkpoint(tmp_path):
    assert main(_args(tmp_path, "a", "trainer.resume=auto", "trainer.epochs=1")) == 0  # fresh
    ckpts = tmp_path / "a" / "checkpoints"
    assert _state(ckpts / "last.ckpt")["global_step"] == 6
    time.sleep(0.01)
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:5000])  # torn write
    with pytest.warns(UserWarning, match="skipping damaged checkpoint.*last.ckpt"):
        assert main(_args(tmp_path, "a", "trainer.resume=auto")) == 0  # from epoch000.ckpt
    assert _state(ckpts / "last.ckpt")["global_step"] == 12


# --------------------------------------------------------------------------- collapse
COLLAPSE = ["teacher.temperature=50", "teacher.warmup_temperature=50",
            "dino.student_temperature=50", "trainer.collapse_window=3", "trainer.epochs=1"]


def test_forced_uniform_collapse_is_reported_and_can_stop_the_run(tmp_path, capsys):
    with pytest.warns(UserWarning, match="uniform collapse.*remedies.*temperature"):
        assert main(_args(tmp_path, "c", *COLLAPSE)) == 0
    out = capsys.readouterr().out
    assert "collapse check: uniform collapse" in out and "since step" in out
    assert main(_args(tmp_path, "s", *COLLAPSE, "trainer.stop_on_collapse=true")) == 3
    err = capsys.readouterr().err
    assert "uniform collapse" in err and err.count("\n") == 1
    assert "newest checkpoint with finite weights: none" in err  # stopped within the first epoch
    assert main(_args(tmp_path, "ok", "trainer.epochs=1")) == 0  # a healthy run says so
    assert "collapse check: ok" in capsys.readouterr().out


# --------------------------------------------------------------------------- hostile files
def _hostile_folder(root: Path) -> Path:
    from PIL import Image

    root.mkdir()
    for i in range(40):
        Image.new("L", (28, 28), i * 5).save(root / f"good{i:02d}.png")
    Image.fromarray(np.full((28, 28), 30000, dtype=np.uint16)).save(root / "deep16.png")
    Image.new("P", (28, 28), 3).save(root / "palette.png", transparency=3)
    Image.new("CMYK", (28, 28), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.new("RGBA", (28, 28), (255, 0, 0, 0)).save(root / "rgba.png")
    _bomb(root / "bomb.png")
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("hello")
    (root / "loop").mkdir()
    os.symlink(root, root / "loop" / "again")  # a symlink loop
    return root


def _bomb(path: Path, side: int = 50_000) -> None:
    """A PNG whose header claims ``side`` x ``side`` pixels (a few hundred bytes on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_hostile_folder_trains_and_counts_skipped_files_over_workers(tmp_path, capsys):
    folder = _hostile_folder(tmp_path / "imgs")
    args = _args(tmp_path, "h", "data.dataset=folder", f"data.path={folder}", "data.limit=null",
                 "trainer.epochs=1", "data.num_workers=2", "data.batch_size=47")  # every file once
    with pytest.warns(UserWarning) as record:
        assert main(args) == 0
    text = "\n".join(str(w.message) for w in record)
    assert "3 unreadable image(s) were skipped" in text  # bomb, empty, text: seen in the workers
    assert "unreadable images skipped: 3" in capsys.readouterr().out


def test_folder_without_a_readable_image_fails_before_training_with_a_count(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(5):
        (bad / f"{i}.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning):
        assert main(_args(tmp_path, "b", "data.dataset=folder", f"data.path={bad}", "data.limit=null")) == 2
    err = capsys.readouterr().err
    assert "none of the 5 image file(s)" in err and "Traceback" not in err
    assert not (tmp_path / "b" / "checkpoints").exists() or not list((tmp_path / "b" / "checkpoints").iterdir())


def test_strict_images_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    folder = tmp_path / "imgs"
    _hostile_folder(folder)
    args = _args(tmp_path, "st", "data.dataset=folder", f"data.path={folder}", "data.limit=null",
                 "data.strict_images=true")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read image" in err and "Traceback" not in err
    assert main([*args, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


# --------------------------------------------------------------------------- config fuzzing
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
WRONG = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**15, max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**12, [1, 2], {"a": 1}, "", "\x00"]),
)


DEMO = load_config("demo")


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(key=st.sampled_from(all_keys()), value=WRONG)
def test_fuzzed_config_values_give_config_errors_only(key, value):
    cfg = copy.deepcopy(DEMO)
    try:
        set_value(cfg, key, value)
        cfg.validate()
    except ConfigError as e:
        assert key in str(e) or "." in str(e)
        return
    v = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
    if isinstance(v, float):
        assert np.isfinite(v), (key, value)  # NaN/inf never get through
    if isinstance(v, int) and not isinstance(v, bool):
        assert abs(v) < 2**41, (key, value)  # no absurd sizes


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(blob=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
def test_fuzzed_yaml_files_give_config_errors_only(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_bytes(blob)
    with contextlib.suppress(ConfigError):
        load_config(path)


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("- a\n- b\n", "must be a mapping"),
    ("just text", "must be a mapping"),
    ("base: self.yaml\n", "cycle"),
    ("base: nonexistent_preset\n", "neither a file nor a preset"),
    ("optim:\n  lr: .nan\n", "optim.lr: must be a finite number"),
    ("optim:\n  weight_decay: .inf\n", "optim.weight_decay: must be a finite number"),
    ("data:\n  batch_size: 1000000000000\n", "data.batch_size: must be <="),
    ("trainer:\n  accelerator: [cpu]\n", "trainer.accelerator: expected str"),
    ("trainer:\n  strategy: warp_drive\n", "trainer.strategy"),
    ("trainer:\n  precision: 8-mixed\n", "trainer.precision: must be one of"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "self.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    path.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(ConfigError, match="binary"):
        read_yaml(path)


# --------------------------------------------------------------------------- malicious pickles
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _evil_file(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Evil(marker)}, path,
               pickle_protocol=pickle.DEFAULT_PROTOCOL)
    return path


def test_malicious_pickle_is_refused_at_every_entry_point(tmp_path, capsys):
    from dinokit.export import load_backbone
    from dinokit.weights import WeightsError, read_file

    marker = tmp_path / "pwned"
    evil = _evil_file(tmp_path / "run" / "checkpoints" / "evil.ckpt", marker)
    evil_pt = _evil_file(tmp_path / "evil.pt", marker)
    v3 = ["train", "--config", "dinov3_tiny_cpu", "data.dataset=digits", "data.limit=64",
          "data.batch_size=32", "data.num_workers=0", "trainer.progress=false",
          f"trainer.output_dir={tmp_path}", "trainer.run_name=g", f"gram.teacher_path={evil_pt}"]
    entry_points = {
        "resume": _args(tmp_path, "r", f"trainer.resume={evil}"),
        "init weights": _args(tmp_path, "i", f"model.init_weights={evil_pt}"),
        "gram teacher": v3,
        "eval": ["eval", "knn", "--checkpoint", str(evil), "--train-data", "digits", "--val-data", "digits"],
        "export": ["export", "--checkpoint", str(evil), "--output", str(tmp_path / "out")],
    }
    for name, argv in entry_points.items():
        assert main(argv) == 2, name
        assert "Traceback" not in capsys.readouterr().err, name
        assert not marker.exists(), f"{name} executed the pickle"
    with pytest.raises(WeightsError):
        read_file(evil_pt)
    fake = tmp_path / "evil.safetensors"
    fake.write_bytes(evil_pt.read_bytes())
    (tmp_path / "evil.json").write_text('{"architecture": "vit_tiny_patch16_224", "timm_kwargs": {}}')
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing ran
        load_backbone(fake)
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(evil_pt, weights_only=False)
    assert marker.exists()


def test_errors_from_loader_workers_become_one_line():
    from dinokit.cli._common import _one_line, exit_code
    from dinokit.data import ImageReadError

    e = ImageReadError("Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most "
                       "recent call last):\n  File x\ndinokit.data.datasets.ImageReadError: cannot read a.png")
    assert _one_line(e) == "cannot read a.png" and exit_code(e) == 2


def test_enospc_error_class_names_path_and_cause(tmp_path):
    err = checkpoint_io.CheckpointWriteError(tmp_path / "x.ckpt", OSError(errno.ENOSPC, "No space left on device"))
    assert "x.ckpt" in str(err) and "No space left" in str(err) and err.exit_code == 74


def test_slurm_requeue_calls_scontrol_with_the_job_id(tmp_path, monkeypatch):
    from dinokit.train.preemption import slurm_requeue

    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_requeue()
    assert log.read_text().split() == ["requeue", "4242"]
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.warns(UserWarning, match="not running under SLURM"):
        assert not slurm_requeue()


def test_sigusr1_and_sigterm_only_set_a_flag_until_the_step_ends():
    from dinokit.train.preemption import PreemptionCallback

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        cb = PreemptionCallback("unused.ckpt")
        before = signal.getsignal(sig)
        cb.install()
        try:
            os.kill(os.getpid(), sig)  # would end the process without the handler
            time.sleep(0.05)
            assert cb.received == sig.name
        finally:
            cb.uninstall()
        assert signal.getsignal(sig) == before


def test_resume_auto_needs_a_run_name_and_a_damaged_explicit_checkpoint_is_named(tmp_path, capsys):
    assert main(["train", "--config", "demo", *TINY, f"trainer.output_dir={tmp_path}",
                 "trainer.resume=auto"]) == 2
    assert "trainer.resume=auto needs trainer.run_name" in capsys.readouterr().err
    bad = tmp_path / "x" / "checkpoints" / "torn.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert main(_args(tmp_path, "x", f"trainer.resume={bad}")) == 2
    err = capsys.readouterr().err
    assert "torn.ckpt does not load" in err and "Traceback" not in err
