"""Fault injection on what dinokit writes and streams: a kill (SIGKILL) or a full disk while
``dinokit embed``, ``dinokit export`` or ``dinokit data shard`` writes never leaves a partial
file under the final name and keeps the earlier output; a truncated WebDataset shard is skipped
by name (lenient) or stops the run in one line (strict); outputs follow the umask.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit import atomic
from dinokit.cli import main
from dinokit.data.streaming import ShardReadError, ShardStream, StreamLoader, write_shards
from dinokit.export import export_backbone, export_timm_folder, load_backbone

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 24


def _labels(items):
    return [y for _, y in items]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """24 tiny PNGs in 3 class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        d = root / f"c{i % 3}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def method():
    torch.manual_seed(0)
    return dinokit.DINO("vit_tiny_patch16_224", encoder_kwargs=dict(img_size=32, patch_size=8, depth=1,
                        embed_dim=32, num_heads=2), n_prototypes=16, projector_hidden_dim=16,
                        projector_bottleneck_dim=8)


@pytest.fixture(scope="module")
def exported(method, tmp_path_factory):
    return export_timm_folder(method, tmp_path_factory.mktemp("exp") / "hub")


def _run_killed(script: str, sentinel: Path, *argv: str) -> None:
    """Run ``script`` in a fresh interpreter, wait until it has written ``sentinel`` (it is then
    in the middle of a write), SIGKILL it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(sentinel), *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not sentinel.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the writer ended before the kill: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# --------------------------------------------------------------------------- the atomic helper
def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_temporary_file(tmp_path):
    path = atomic.write_text(tmp_path / "r.json", "old")
    with pytest.raises(atomic.OutputWriteError, match=r"r\.json: No space left on device"), \
            atomic.atomic_write(path, "w") as f:
        f.write("half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".f.npy{atomic.TEMP_MARK}{dead}-abcd").write_bytes(b"partial")
    (tmp_path / f".f.npy{atomic.TEMP_MARK}{os.getpid()}-abcd").write_bytes(b"a live writer's")
    atomic.write_bytes(tmp_path / "f.npy", b"new")
    assert sorted(os.listdir(tmp_path)) == [f".f.npy{atomic.TEMP_MARK}{os.getpid()}-abcd", "f.npy"]


def test_a_folder_is_swapped_in_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "out"
    with atomic.atomic_folder(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic.atomic_folder(dest) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed half way")
    assert (dest / "a").read_text() == "1" and _visible(tmp_path) == ["out"] and len(os.listdir(tmp_path)) == 1
    with atomic.atomic_folder(dest) as tmp:
        (tmp / "b").write_text("3")
    assert os.listdir(dest) == ["b"] and len(os.listdir(tmp_path)) == 1  # replaced, old one deleted
    with pytest.raises(FileExistsError):
        atomic.atomic_folder(dest, replace=False).__enter__()


# --------------------------------------------------------------------------- dinokit embed
def _embed_args(exported: Path, images: Path, out: Path) -> list[str]:
    return ["embed", "--checkpoint", str(exported), "--data", str(images), "--output", str(out),
            "--no-progress"]


def _half_written_npy(file, arr, *args, **kwargs):
    """np.save that writes part of the file and then finds the disk full."""
    f = open(file, "wb") if isinstance(file, (str, Path)) else file  # noqa: SIM115 - the old code passes a path
    f.write(b"\x93NUMPY" + b"\0" * 100)
    f.flush()
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_embed_keeps_the_earlier_embeddings(exported, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "emb"
    assert main(_embed_args(exported, images, out)) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    monkeypatch.setattr(np, "save", _half_written_npy)
    code = main(_embed_args(exported, images, out))
    err = capsys.readouterr().err
    assert code == 74, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "emb.npy" in lines[0], err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, no temp file


EMBED_KILL = """
import pathlib, sys, time
import numpy as np
sentinel = pathlib.Path(sys.argv[1])
def slow_save(file, arr, *a, **k):
    f = open(file, "wb") if isinstance(file, (str, pathlib.Path)) else file
    f.write(b"\\x93NUMPY" + b"\\0" * 100)
    f.flush()
    sentinel.write_text("writing")
    time.sleep(120)
np.save = slow_save
from dinokit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_embed_keeps_the_earlier_embeddings(exported, images, tmp_path):
    out = tmp_path / "emb"
    assert main(_embed_args(exported, images, out)) == 0
    old, names = np.load(tmp_path / "emb.npy"), _visible(tmp_path)  # .npy, .csv (and .parquet with pyarrow)
    _run_killed(EMBED_KILL, tmp_path / "sentinel", *_embed_args(exported, images, out))
    np.testing.assert_array_equal(np.load(tmp_path / "emb.npy"), old)
    assert _visible(tmp_path) == sorted([*names, "sentinel"])


# --------------------------------------------------------------------------- dinokit export
EXPORT_KILL = """
import pathlib, sys, time
import safetensors.torch
sentinel = pathlib.Path(sys.argv[1])
def slow_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\\x00" * 64)
    sentinel.write_text("writing")
    time.sleep(120)
safetensors.torch.save_file = slow_save_file
from dinokit.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--config", "demo", "data.dataset=digits", "data.limit=64", "data.batch_size=32",
                     "data.num_workers=0", "trainer.epochs=1", "trainer.progress=false",
                     "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 16, num_heads: 2, "
                     "in_chans: 1}", "dino.n_prototypes=16", "heads.hidden_dim=16",
                     "heads.bottleneck_dim=8", f"trainer.output_dir={out}", "trainer.run_name=r"]) == 0
    return out / "r"


def test_sigkill_during_export_leaves_the_earlier_export_whole(run_dir, tmp_path):
    """``--format both`` killed while writing the folder's weights: the earlier folder and single
    file are untouched and load as before."""
    out = tmp_path / "bb"
    args = ["export", "--checkpoint", str(run_dir), "--output", str(out)]
    assert main(args) == 0
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = [load_backbone(p)(x).cls for p in (out, out.with_suffix(".safetensors"))]
    _run_killed(EXPORT_KILL, tmp_path / "sentinel", *args)
    with torch.no_grad():
        for p, r in zip((out, out.with_suffix(".safetensors")), ref):
            torch.testing.assert_close(load_backbone(p)(x).cls, r, rtol=0, atol=0)
    assert _visible(out) == ["config.json", "dinokit.json", "model.safetensors"]
    assert _visible(tmp_path) == ["bb", "bb.json", "bb.safetensors", "sentinel"]


def _interrupted_save_file(tensors, filename, metadata=None):
    """safetensors' save_file interrupted half way (Ctrl-C)."""
    with open(filename, "wb") as f:
        f.write(b"\x00" * 64)
    raise KeyboardInterrupt


@pytest.mark.parametrize("fmt", ["folder", "file"])
def test_an_interrupted_export_leaves_nothing_half_written(run_dir, tmp_path, monkeypatch, fmt):
    import safetensors.torch

    out = tmp_path / "bb"
    args = ["export", "--checkpoint", str(run_dir), "--output", str(out), "--format", fmt]
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", _interrupted_save_file)
        assert main(args) == 130
    assert os.listdir(tmp_path) == []  # a first export: nothing under its name, no temporary file
    assert main(args) == 0
    target = out if fmt == "folder" else out.with_suffix(".safetensors")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", _interrupted_save_file)
        assert main(args) == 130
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    load_backbone(target)


def test_export_replaces_an_earlier_export_folder_and_refuses_any_other_folder(method, tmp_path, capsys):
    folder = export_timm_folder(method, tmp_path / "hub")
    assert export_timm_folder(method, folder) == folder  # a second export replaces the first
    assert _visible(folder) == ["config.json", "dinokit.json", "model.safetensors"]
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="photos exists and is not an export folder"):
        export_timm_folder(method, other)
    assert _visible(other) == ["holiday.jpg"]


# --------------------------------------------------------------------------- file modes
def test_outputs_follow_the_umask(method, exported, images, tmp_path):
    old = os.umask(0o022)
    try:
        export_backbone(method, tmp_path / "single")
        folder = export_timm_folder(method, tmp_path / "hub")
        assert main(_embed_args(exported, images, tmp_path / "emb")) == 0
        write_shards(images, tmp_path / "shards", shard_size=12)
    finally:
        os.umask(old)
    files = [tmp_path / "single.safetensors", tmp_path / "single.json", *folder.iterdir(),
             tmp_path / "emb.npy", tmp_path / "emb.csv", *(tmp_path / "shards").iterdir()]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


# --------------------------------------------------------------------------- dinokit data shard
SHARD_KILL = """
import pathlib, sys, time
import webdataset
sentinel = pathlib.Path(sys.argv[1])
real = webdataset.TarWriter.write
calls = []
def slow_write(self, obj):
    calls.append(1)
    n = real(self, obj)
    if len(calls) == 5:  # the first sample of the second shard (shards of 4)
        self.stream.flush()
        sentinel.write_text("writing")
        time.sleep(120)
    return n
webdataset.TarWriter.write = slow_write
from dinokit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _members(path: Path) -> int:
    with tarfile.open(path) as tar:
        return len(tar.getmembers())


def test_sigkill_during_data_shard_leaves_only_complete_shards(images, tmp_path):
    out = tmp_path / "shards"
    _run_killed(SHARD_KILL, tmp_path / "sentinel", "data", "shard", "--input", str(images), "--output",
                str(out), "--shard-size", "4")
    assert _visible(out) == ["shard-000000.tar"]  # the shard being written is not there, nor index.json
    assert _members(out / "shard-000000.tar") == 8  # 4 images + 4 labels: complete


def test_a_failed_data_shard_write_leaves_only_complete_shards(images, tmp_path, monkeypatch, capsys):
    import webdataset

    real, calls = webdataset.TarWriter.write, []

    def failing(self, obj):
        calls.append(1)
        if len(calls) == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, obj)

    monkeypatch.setattr(webdataset.TarWriter, "write", failing)
    out = tmp_path / "shards"
    assert main(["data", "shard", "--input", str(images), "--output", str(out), "--shard-size", "4"]) == 74
    err = capsys.readouterr().err
    assert "shard-000001.tar: No space left on device" in err and err.count("\n") == 1
    assert os.listdir(out) == ["shard-000000.tar"] and _members(out / "shard-000000.tar") == 8


# --------------------------------------------------------------------------- damaged shards
@pytest.fixture(scope="module")
def damaged(images, tmp_path_factory):
    """8 shards of 3 samples; shard-000002.tar truncated to a third."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(images, out, shard_size=3)
    bad = out / "shard-000002.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    return out


def test_a_truncated_shard_is_skipped_by_name_in_lenient_mode(damaged):
    stream = ShardStream(damaged, batch_size=3, collate=_labels, seed=0, shuffle=0)
    dl = StreamLoader(stream, 7, num_workers=0)
    with pytest.warns(UserWarning, match=r"damaged shard .*shard-000002\.tar: .*rest of this shard is skipped"):
        labels = [y for batch in dl for y in batch]
    assert len(labels) == 21  # one pass: 24 samples less the 3 of the damaged shard (its first is cut)
    assert stream.damaged == [str(damaged / "shard-000002.tar")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next pass skips it again without a second warning
        assert len([y for batch in dl for y in batch]) == 21


def test_damaged_shards_found_by_loader_workers_are_listed_in_the_main_process(damaged):
    stream = ShardStream(damaged, batch_size=3, collate=_labels, seed=0, shuffle=4)
    dl = StreamLoader(stream, 7, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len([y for batch in dl for y in batch]) == 21
    assert stream.damaged == [str(damaged / "shard-000002.tar")]


def test_a_truncated_shard_stops_a_strict_stream_naming_it(damaged):
    dl = StreamLoader(ShardStream(damaged, batch_size=3, collate=_labels, strict=True, shuffle=0), 7)
    with pytest.raises(ShardReadError, match=r"damaged shard .*shard-000002\.tar: .*strict_images"):
        list(dl)


STREAM = [
    "data.dataset=shards", "data.batch_size=3", "crops.n_local=2", "crops.preset=small",
    "crops.source_size=28", "data.shuffle_buffer=4", "data.iterations_per_epoch=7", "trainer.epochs=1",
    "trainer.progress=false", "dino.n_prototypes=16", "heads.hidden_dim=16", "heads.bottleneck_dim=8",
    "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 16, num_heads: 2, in_chans: 1}",
]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_a_truncated_shard_lenient_finishes_and_strict_stops_in_one_line(damaged, tmp_path, capsys,
                                                                                      workers):
    args = ["train", "--config", "demo", *STREAM, f"data.path={damaged}", f"data.num_workers={workers}",
            f"trainer.output_dir={tmp_path}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "trainer.run_name=lenient"]) == 0
    out = capsys.readouterr().out
    assert f"damaged shards cut short: 1 ({damaged / 'shard-000002.tar'})" in out
    assert main([*args, "trainer.run_name=strict", "data.strict_images=true"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dinokit train: error")]
    assert len(lines) == 1 and "damaged shard" in lines[0] and "shard-000002.tar" in lines[0], err
    assert "Traceback" not in err
