"""User and environment errors end in one line naming the input and exit code 2 (74 for a
checkpoint that cannot be written), and results that would be silent nonsense are refused or
said: unknown backbones and arguments, device lists, checkpoints that do not fit, damaged export
metadata, a full disk, refused pickles, one-class k-NN banks, clamped k, duplicate YAML keys,
overwritten evaluation results, and the decompression-bomb limit.
"""

from __future__ import annotations

import errno
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.cli import main
from dinokit.config import ConfigError, load_config, load_yaml
from dinokit.data import ImageReadError, read_image
from dinokit.data.datasets import DEFAULT_MAX_IMAGE_PIXELS
from dinokit.export import export_backbone, export_timm_folder
from dinokit.train import checkpoint_io

TINY = [
    "data.dataset=digits", "data.limit=64", "data.batch_size=32", "data.num_workers=0", "trainer.epochs=1",
    "trainer.progress=false", "dino.n_prototypes=16", "heads.hidden_dim=16", "heads.bottleneck_dim=8",
    "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 16, num_heads: 2, in_chans: 1}",
]
TORCH_ADVICE = ("Re-running", "weights_only` set to `False", "weights_only=False", "will likely succeed")


def _train(tmp_path: Path, name: str, *extra: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["train", "--config", "demo", *TINY, f"trainer.output_dir={tmp_path}",
                     f"trainer.run_name={name}", *extra])


def _one_error_line(capsys, command: str = "train") -> str:
    """The one ``dinokit <command>: error: ...`` line on stderr (no traceback, not a bug report)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"dinokit {command}: error")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "--debug" not in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert _train(out, "r") == 0
    return out / "r"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    method = dinokit.DINO("vit_tiny_patch16_224", encoder_kwargs=dict(img_size=32, patch_size=8, depth=1,
                          embed_dim=32, num_heads=2), n_prototypes=16, projector_hidden_dim=16,
                          projector_bottleneck_dim=8)
    return method, tmp_path_factory.mktemp("exp")


def _folder(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(classes)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


# --------------------------------------------------------------------------- exit code 2, one line
@pytest.mark.parametrize(("override", "named"), [
    ("backbone.name=vit_tinyy", "backbone.name: unknown timm model name 'vit_tinyy'"),
    ("backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 16, num_heads: 2, in_chans: 1, "
     "colour: 3}", "backbone.kwargs: vit_tiny_patch16_224 does not take"),
    ("backbone.name=torchvision/resnet18", None),  # a CNN name that exists, with ViT arguments
    ("trainer.devices=[1,2]", "trainer.devices: [1, 2] are GPU indices"),
])
def test_bad_backbones_and_device_lists_are_user_errors_in_one_line(tmp_path, capsys, override, named):
    assert _train(tmp_path, "x", override) == 2
    line = _one_error_line(capsys)
    assert named is None or named in line, line
    if named is None:
        assert "backbone.kwargs" in line and "img_size" in line


def test_a_checkpoint_that_does_not_fit_its_config_is_named_with_its_first_bad_key(run_dir, tmp_path, capsys):
    obj = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    sd = obj["state_dict"]
    for k in [k for k in sd if k.endswith(".weight")]:  # every weight of another shape, as a forger would
        sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])
    sd["method.student.extra"] = torch.zeros(1)
    forged = tmp_path / "forged.ckpt"
    torch.save(obj, forged)
    assert _train(tmp_path, "resumed", f"trainer.resume={forged}", "trainer.epochs=2") == 2
    line = _one_error_line(capsys)
    assert "forged.ckpt does not fit the model of this config" in line and len(line) < 400, line
    first = next(k for k in sd if k.endswith(".weight"))
    assert f"{first}: ({sd[first].shape[0]}," in line and "more)" in line


def test_damaged_export_metadata_is_named(exported, tmp_path, capsys):
    method, _ = exported
    single = export_backbone(method, tmp_path / "bb")
    folder = export_timm_folder(method, tmp_path / "hub")
    images = _folder(tmp_path / "imgs", 2, 2)
    for path, checkpoint in ((single.with_suffix(".json"), single), (folder / "dinokit.json", folder),
                             (folder / "config.json", folder)):
        text = path.read_text()
        path.write_text(text[: len(text) // 2])  # cut short, as by a full disk
        assert main(["embed", "--checkpoint", str(checkpoint), "--data", str(images), "--output",
                     str(tmp_path / "e"), "--no-progress"]) == 2
        line = _one_error_line(capsys, "embed")
        assert f"{path} is not valid JSON" in line and "JSONDecodeError" not in line, line
        path.write_text(text)


class _FillingDisk:
    """A file that takes ``room`` bytes, then fails with ENOSPC, as a disk filling up: torch's zip
    writer then reports ``[enforce fail at inline_container.cc]``, the OSError as its context."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def test_a_full_disk_at_the_first_checkpoint_says_so_and_names_the_path(tmp_path, monkeypatch, capsys):
    real, calls = checkpoint_io._write, []

    def write(obj, f):
        calls.append(1)
        if len(calls) == 1:  # the write probe before training passes
            return real(obj, f)
        return torch.save(obj, _FillingDisk(f, 1000))

    monkeypatch.setattr(checkpoint_io, "_write", write)
    assert _train(tmp_path, "full") == 74
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "enforce fail" not in line, line
    assert str(tmp_path / "full" / "checkpoints" / "epoch") in line  # the file it was writing
    assert os.listdir(tmp_path / "full" / "checkpoints") == []


class _Evil:
    def __reduce__(self):
        return (os.getpid, ())


def test_refused_pickles_are_not_followed_by_torchs_advice_to_load_them_unsafely(run_dir, tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Evil()}, evil)
    newer = tmp_path / "evil5.ckpt"  # protocol 5: refused for its opcodes before any global is seen
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Evil()}, newer, pickle_protocol=5)
    entry_points = {
        "train": [["train", "--config", "demo", *TINY, f"trainer.output_dir={tmp_path}", "trainer.run_name=a",
                   f"trainer.resume={evil}"],
                  ["train", "--config", "demo", *TINY, f"trainer.output_dir={tmp_path}", "trainer.run_name=b",
                   f"model.init_weights={evil}"]],
        "eval": [["eval", "knn", "--checkpoint", str(evil), "--train-data", "digits", "--val-data", "digits"]],
        "export": [["export", "--checkpoint", str(evil), "--output", str(tmp_path / "o")]],
    }
    for command, argvs in entry_points.items():
        for argv in argvs:
            assert main(argv) == 2, argv
            line = _one_error_line(capsys, command)
            assert "evil.ckpt" in line and "refuses" in line and "posix.getpid" in line, line
            assert not any(a in line for a in TORCH_ADVICE), line
            assert main([a.replace("evil.ckpt", "evil5.ckpt") for a in argv]) == 2, argv
            line = _one_error_line(capsys, command)
            assert "evil5.ckpt" in line and "refuses" in line, line
            assert not any(a in line for a in TORCH_ADVICE), line


# --------------------------------------------------------------------------- silent nonsense
def test_knn_refuses_a_one_class_bank_and_says_when_k_is_clamped(exported, tmp_path, capsys):
    method, where = exported
    folder = export_timm_folder(method, where / "knn")
    one, two = _folder(tmp_path / "one", 1, 8), _folder(tmp_path / "two", 2, 4)
    args = ["eval", "knn", "--checkpoint", str(folder), "--val-data", str(two)]
    assert main([*args, "--train-data", str(one), "--ks", "5"]) == 2
    line = _one_error_line(capsys, "eval")
    assert f"--train-data {one}: it has 1 class" in line
    assert main([*args, "--train-data", str(two), "--ks", "5", "50"]) == 0
    out = capsys.readouterr()
    assert "--ks 50: more than the 8 images" in out.err and "clamped to k=8" in out.err
    assert "--ks 5:" not in out.err and "top-1" in out.out


def test_knn_results_of_a_run_keep_the_earlier_file(run_dir, capsys):
    args = ["eval", "knn", "--checkpoint", str(run_dir), "--train-data", "digits", "--val-data", "digits",
            "--limit-train", "40", "--limit-val", "20", "--ks", "5"]
    results = run_dir / "eval" / "knn.json"
    assert main(args) == 0
    capsys.readouterr()
    first = results.read_text()
    os.utime(results, (0, 0))  # an earlier day
    assert main(args) == 0
    out = capsys.readouterr().out
    kept = re.search(r"the earlier results are kept as (knn\.[\w-]+\.json)", out)
    assert kept, out
    assert (run_dir / "eval" / kept.group(1)).read_text() == first and json.loads(results.read_text())


@pytest.mark.parametrize(("text", "key", "lines"), [
    ("base: demo\ndata:\n  batch_size: 8\ntrainer:\n  epochs: 1\ndata:\n  limit: 10\n", "'data'", "lines 2 and 6"),
    ("base: demo\noptim:\n  lr: 0.1\n  momentum: 0.8\n  lr: 0.2\n", "'lr'", "lines 3 and 5"),
])
def test_a_yaml_key_given_twice_is_refused_naming_key_and_file(tmp_path, capsys, text, key, lines):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: {key} appears twice.*{lines}"):
        load_config(path)
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    assert key in _one_error_line(capsys)
    # merge keys may still be overridden, as YAML intends
    assert load_yaml("a: &x {k: 1, j: 2}\nb:\n  <<: *x\n  k: 3\n") == {"a": {"k": 1, "j": 2}, "b": {"k": 3, "j": 2}}


# --------------------------------------------------------------------------- decompression bombs
def test_a_genuine_100_megapixel_photo_is_read_and_the_limit_is_a_data_option(tmp_path):
    from dinokit.train.build import build_dataset

    assert load_config("demo").data.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS >= 200_000_000
    Image.new("1", (10_000, 10_000), 1).save(tmp_path / "big.png")  # 100 Mpx, decodes to 100 MB
    assert read_image(tmp_path / "big.png").size == (10_000, 10_000)
    small = tmp_path / "folder"
    small.mkdir()
    Image.new("L", (40, 40), 3).save(small / "a.png")
    Image.new("L", (20, 20), 3).save(small / "b.png")
    with pytest.raises(ImageReadError, match="a.png: refused as a decompression bomb"):
        read_image(small / "a.png", max_pixels=1000)  # Pillow's header check, with the limit given
    cfg = load_config("demo", ["data.dataset=folder", f"data.path={small}", "data.max_image_pixels=1000"])
    with pytest.warns(UserWarning, match="a.png.*decompression bomb"):
        ds = build_dataset(cfg)
    assert ds.skipped == [str(small / "a.png")] and ds[0][0].size == (20, 20)
