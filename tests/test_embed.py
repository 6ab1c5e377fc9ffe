"""``dinokit embed`` and ``dinokit.embed.embed``: features of a folder of images from an export or a
run, with the export's preprocessing, file names kept, unreadable images skipped and listed."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.cli import main
from dinokit.data import EvalTransform
from dinokit.embed import embed, save_embeddings
from dinokit.export import export_timm_folder

PRE = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "input_size": 32, "channels": 3}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    method = dinokit.DINO("vit_tiny_patch16_224", encoder_kwargs=dict(img_size=32, patch_size=8, depth=1,
                          embed_dim=32, num_heads=2), n_prototypes=16, projector_hidden_dim=16,
                          projector_bottleneck_dim=8)
    return export_timm_folder(method, tmp_path_factory.mktemp("exp") / "hub", preprocessing=PRE), method


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8)).save(root / "b.png")  # grey
    (root / "c.jpg").write_bytes(b"not an image")
    Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(root / "sub" / "d.png")
    return root


def test_embed_uses_the_exports_preprocessing_and_skips_bad_files(exported, images):
    folder, method = exported
    emb = embed(folder, images, batch_size=2, progress=False)
    assert emb.names == ["a.png", "b.png", "sub/d.png"] and emb.skipped == ["c.jpg"]
    assert emb.features.shape == (3, 32) and emb.features.dtype == np.float32
    tf = EvalTransform(32, round(32 / 0.875), PRE["mean"], PRE["std"], 3)
    x = torch.stack([tf(Image.open(images / n)) for n in emb.names])
    with torch.no_grad():
        ref = method.teacher_backbone.eval()(x)
    np.testing.assert_allclose(emb.features, ref.cls.numpy(), rtol=1e-5, atol=1e-5)
    mean = embed(folder, images, pool="mean", progress=False)
    np.testing.assert_allclose(mean.features, ref.patches.mean(1).numpy(), rtol=1e-5, atol=1e-5)
    # a different normalisation would give other features: the comparison above can fail
    other = EvalTransform(32, round(32 / 0.875), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 3)
    with torch.no_grad():
        wrong = method.teacher_backbone(torch.stack([other(Image.open(images / n)) for n in emb.names])).cls
    assert not np.allclose(emb.features, wrong.numpy(), atol=1e-3)


def test_command_writes_the_same_as_the_python_call(exported, images, tmp_path, capsys):
    folder, _ = exported
    assert main(["embed", "--checkpoint", str(folder), "--data", str(images), "--output", str(tmp_path / "f"),
                 "--batch-size", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image" in out and "c.jpg" in out
    feats = np.load(tmp_path / "f.npy")
    emb = embed(folder, images, progress=False)
    np.testing.assert_allclose(feats, emb.features, rtol=1e-6, atol=1e-6)
    rows = list(csv.reader((tmp_path / "f.csv").open()))
    assert rows[0] == ["row", "name", "label"] and [r[1] for r in rows[1:]] == emb.names
    paths = save_embeddings(emb, tmp_path / "g.npy")
    assert paths[0].name == "g.npy" and paths[1].name == "g.csv"


def test_embed_from_a_run_and_bad_arguments(tmp_path, images):
    assert main(["train", "--config", "demo", "data.dataset=digits", "data.limit=64", "data.batch_size=32",
                 "data.num_workers=0", "trainer.epochs=1", "trainer.max_steps=1", "trainer.progress=false",
                 "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 16, num_heads: 2, "
                 "in_chans: 1}", "dino.n_prototypes=16", "heads.hidden_dim=16",
                 "heads.bottleneck_dim=8", f"trainer.output_dir={tmp_path}", "trainer.run_name=r"]) == 0
    emb = embed(tmp_path / "r", "digits", split="test", limit=10, progress=False)
    assert emb.features.shape == (10, 16) and emb.names[0] == "digits/test/0" and emb.labels[0] >= 0
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean'"):
        embed(tmp_path / "r", images, pool="max")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed(tmp_path / "nope", images)
