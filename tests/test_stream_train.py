"""``data.dataset=shards``: training streams WebDataset shards written by ``dinokit data shard``,
an epoch is a fixed number of iterations, and a run stopped mid-epoch resumes exactly."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main

TINY = [
    "data.dataset=shards", "data.batch_size=4", "data.num_workers=0", "crops.n_local=2",
    "crops.preset=small", "crops.source_size=28", "data.shuffle_buffer=8",
    "trainer.epochs=2", "trainer.progress=false", "trainer.log_every_n_steps=1",
    "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, in_chans: 1}",
    "dino.n_prototypes=32", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
    "optim.warmup_epochs=0", "optim.min_lr=0.0005", "optim.lr=0.0005", "optim.weight_decay_end=0.04",
    "teacher.momentum=0.996", "teacher.final_momentum=0.996",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    for i in range(24):
        d = root / "images" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(d / f"{i}.png")
    out = root / "shards"
    assert main(["data", "shard", "--input", str(root / "images"), "--output", str(out),
                 "--shard-size", "6"]) == 0
    return out


def _train(tmp_path, shards, name, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["train", "--config", "demo", *TINY, f"data.path={shards}",
                     f"trainer.output_dir={tmp_path}", f"trainer.run_name={name}", *extra])


def _ckpt(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def test_training_streams_shards_with_one_pass_per_epoch(tmp_path, shards):
    assert _train(tmp_path, shards, "run") == 0
    ckpt = _ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 * (24 // 4)  # index.json: 24 samples, batch 4, one process


def test_a_stream_resumes_mid_epoch_exactly(tmp_path, shards):
    assert _train(tmp_path, shards, "ref", "data.iterations_per_epoch=5", "trainer.max_steps=8") == 0
    assert _train(tmp_path, shards, "cut", "data.iterations_per_epoch=5", "trainer.max_steps=7") == 0
    assert _train(tmp_path, shards, "cut", "data.iterations_per_epoch=5", "trainer.max_steps=8",
                  "trainer.resume=last") == 0
    a = _ckpt(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    b = _ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=0, msg=k)


def _said(capsys):
    out = capsys.readouterr()
    return out.out + out.err


def test_shard_errors_name_the_key(tmp_path, shards, capsys):
    assert _train(tmp_path, tmp_path / "nowhere", "x") == 2
    assert "data.path" in _said(capsys)
    assert _train(tmp_path, shards, "y", "data.batch_size=64") == 2
    assert "data.batch_size" in _said(capsys)
    assert _train(tmp_path, shards, "z", "trainer.knn_every_n_epochs=1") == 2
    assert "data.dataset" in _said(capsys)
