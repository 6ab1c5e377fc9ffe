"""Export/load round trips (dinokit and timm) and the eval/viz/export commands on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dinokit
from dinokit.cli import main

TINY = ["data.dataset=digits", "data.limit=128", "data.batch_size=32", "data.num_workers=0",
        "trainer.epochs=1", "trainer.progress=false", "trainer.log_every_n_steps=1"]
VIT = ["model.backbone_kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, in_chans: 1}",
       "model.n_prototypes=32", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--config", "demo", *TINY, *VIT, f"trainer.output_dir={out}",
                 "trainer.run_name=vit"]) == 0
    return out / "vit"


def _png_ok(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=float).std() > 1.0


def test_export_round_trips_through_dinokit_and_timm(run_dir, tmp_path):
    path = dinokit.export_backbone(run_dir, tmp_path / "bb")
    meta = json.loads((tmp_path / "bb.json").read_text())
    assert meta["architecture"] == "vit_tiny_patch16_224" and meta["method"] == "dino"
    assert meta["patch_size"] == 4 and meta["image_size"] == 28 and meta["training_steps"] == 4
    from dinokit.cli._common import load

    trained = load(str(run_dir)).backbone
    loaded = dinokit.load_backbone(path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = trained(x).cls
        torch.testing.assert_close(loaded(x).cls, ref, rtol=0, atol=0)
        model = timm.create_model(meta["architecture"], pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(path)), **meta["timm_kwargs"])
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
    fresh = dinokit.build_backbone("vit_tiny_patch16_224", encoder_kwargs=meta["timm_kwargs"])
    assert not torch.allclose(fresh(x).cls, ref)  # the comparison above can fail


def test_foreign_files_give_clear_errors(tmp_path, capsys):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"garbage")
    assert main(["eval", "knn", "--checkpoint", str(bad), "--train-data", "digits", "--val-data", "digits"]) == 2
    assert "not a dinokit/timm checkpoint" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, bad)
    assert main(["export", "--checkpoint", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "not a dinokit training checkpoint" in capsys.readouterr().err


def test_eval_commands_print_accuracy_and_save_json(run_dir, capsys):
    assert main(["eval", "knn", "--checkpoint", str(run_dir), "--train-data", "digits",
                 "--val-data", "digits", "--ks", "5", "20"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and (run_dir / "eval" / "knn.json").is_file()
    assert main(["eval", "linear", "--checkpoint", str(run_dir), "--train-data", "digits",
                 "--val-data", "digits", "--epochs", "3", "--lrs", "0.1"]) == 0
    assert "best: top-1" in capsys.readouterr().out
    res = json.loads((run_dir / "eval" / "linear.json").read_text())
    assert 0 <= res["top1"] <= 100


def test_viz_commands_write_pictures(run_dir, tmp_path, capsys):
    assert main(["viz", "attention", "--checkpoint", str(run_dir), "--images", "digits", "--n", "2",
                 "--output", str(tmp_path / "att")]) == 0
    assert main(["viz", "pca", "--checkpoint", str(run_dir), "--images", "digits", "--n", "3",
                 "--output", str(tmp_path / "pca")]) == 0
    assert main(["viz", "tsne", "--checkpoint", str(run_dir), "--data", "digits", "--limit", "120",
                 "--output", str(tmp_path / "tsne.png")]) == 0
    assert main(["viz", "curves", "--run", str(run_dir), "--output", str(tmp_path / "curves.png")]) == 0
    for f in ("att/attention_0.png", "att/attention_1.png", "pca/pca.png", "tsne.png", "curves.png"):
        assert _png_ok(tmp_path / f), f


def test_cnn_attention_and_unlabelled_knn_are_explained(tmp_path, capsys):
    assert main(["train", "--config", "demo", *TINY, "model.backbone=resnet18",
                 "model.backbone_kwargs={in_chans: 1}", "model.n_prototypes=16", "model.head_hidden_dim=16",
                 "model.head_bottleneck_dim=8", f"trainer.output_dir={tmp_path}", "trainer.run_name=cnn"]) == 0
    capsys.readouterr()
    assert main(["viz", "attention", "--checkpoint", str(tmp_path / "cnn"), "--images", "digits",
                 "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "attention maps need a ViT" in err and "dinokit viz pca" in err
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("L", (28, 28), i * 60).save(flat / f"{i}.png")
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "cnn"), "--train-data", str(flat),
                 "--val-data", str(flat)]) == 2
    assert "need labelled data" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["eval", "knn"], ["eval", "linear"], ["viz", "attention"], ["viz", "pca"],
                                 ["viz", "tsne"], ["viz", "curves"], ["export"], ["demo"], ["presets"]])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_linear_probe_separable_features():
    from dinokit.eval import linear_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    x = x[(x[:, 0] + x[:, 1]).abs() > 0.5]  # linearly separable with a margin
    y = (x[:, 0] + x[:, 1] > 0).long()
    for mode in ("sgd", "logistic"):
        res = linear_probe(x, y, x, y, mode=mode, epochs=30, lrs=(0.5,) if mode == "sgd" else (100.0,),
                           progress=False)
        assert res.top1 == 100.0, mode
    with pytest.raises(ValueError, match="labelled"):
        linear_probe(x, None, x, y)
