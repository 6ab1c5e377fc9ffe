"""Export/load round trips (dinokit and timm) and the eval/viz/export commands on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dinokit
from conftest import settings
from dinokit.cli import main

TINY = ["data.dataset=digits", "data.limit=128", "data.batch_size=32", "data.num_workers=0",
        "trainer.epochs=1", "trainer.progress=false", "trainer.log_every_n_steps=1"]
VIT = ["backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, in_chans: 1}",
       "dino.n_prototypes=32", "heads.hidden_dim=32", "heads.bottleneck_dim=16"]


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
    err = capsys.readouterr().err
    assert "holds backbone-only weights" in err and "expected a dinokit training checkpoint" in err


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
    assert main(["train", "--config", "demo", *TINY, "backbone.name=resnet18", "backbone.init=timm",
                 "backbone.kwargs={in_chans: 1}", "dino.n_prototypes=16", "heads.hidden_dim=16",
                 "heads.bottleneck_dim=8", f"trainer.output_dir={tmp_path}", "trainer.run_name=cnn"]) == 0
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
    # export from the run directory keeps in_chans=1; timm and dinokit both load it
    assert main(["export", "--checkpoint", str(tmp_path / "cnn"), "--output", str(tmp_path / "exp")]) == 0
    from dinokit.cli._common import load

    trained = load(str(tmp_path / "cnn")).backbone
    assert trained.channels_last  # the training layout (backbone.channels_last) ...
    trained.use_channels_last(False)  # ... and timm's default one, for a bit-exact comparison
    x = torch.randn(2, 1, 32, 32)
    model = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True).eval()
    with torch.no_grad():
        ref = trained(x).cls
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), ref,
                                   rtol=0, atol=0)
        torch.testing.assert_close(dinokit.load_backbone(tmp_path / "exp.safetensors")(x).cls, ref,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("cmd", [["eval", "knn"], ["eval", "linear"], ["viz", "attention"], ["viz", "pca"],
                                 ["viz", "tsne"], ["viz", "curves"], ["export"], ["embed"], ["demo"], ["presets"]])
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


def _tiny_method(kind):
    torch.manual_seed(0)
    if kind == "vit":
        return dinokit.DINO("vit_tiny_patch16_224", encoder_kwargs=dict(img_size=28, patch_size=4, depth=1,
                            embed_dim=32, num_heads=2, in_chans=1), n_prototypes=16, projector_hidden_dim=16,
                            projector_bottleneck_dim=8)
    if kind == "dinov3":
        tiny = dict(depth=1, embed_dim=32, num_heads=2)
        return dinokit.DINOv3("vit_small_patch16_dinov3", n_cls_prototypes=16, n_patch_prototypes=16,
                              projector_hidden_dim=16, projector_bottleneck_dim=8,
                              settings=settings(backbone={"kwargs": tiny}))
    # timm's (contiguous) layout, so the export is compared bit for bit (channels-last rounds otherwise)
    return dinokit.DINO("resnet18", encoder_kwargs=dict(in_chans=1), n_prototypes=16, projector_hidden_dim=16,
                        projector_bottleneck_dim=8, settings=settings(backbone={"channels_last": False}))


@pytest.mark.parametrize("kind", ["vit", "cnn", "dinov3"])
def test_export_from_a_method_keeps_how_the_backbone_was_built(kind, tmp_path):
    from dinokit.export import export_timm_folder

    method = _tiny_method(kind)
    with torch.no_grad():  # make the student differ from the teacher, to see which one is exported
        for p in method.student_backbone.parameters():
            p.add_(0.5)
    chans = method.teacher_backbone.in_chans
    x = torch.randn(2, chans, 32, 32)
    path = dinokit.export_backbone(method, tmp_path / "bb")
    meta = json.loads((tmp_path / "bb.json").read_text())
    if kind == "cnn":
        assert meta["timm_kwargs"]["in_chans"] == 1  # was {}: loading failed on conv1's shape
    folder = export_timm_folder(method, tmp_path / "hub")
    timm_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    teacher = method.teacher_backbone.eval()
    with torch.no_grad():
        ref = teacher(x).cls
        torch.testing.assert_close(dinokit.load_backbone(path)(x).cls, ref, rtol=0, atol=0)
        torch.testing.assert_close(dinokit.load_backbone(folder)(x).cls, ref, rtol=0, atol=0)
        feats = timm_model.forward_features(x)
        got = feats[:, 0] if feats.ndim == 3 else timm_model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert not torch.allclose(method.student_backbone.eval()(x).cls, ref)
    export_timm_folder(method, tmp_path / "student", which="student")
    with torch.no_grad():
        torch.testing.assert_close(dinokit.load_backbone(tmp_path / "student")(x).cls,
                                   method.student_backbone(x).cls, rtol=0, atol=0)


def test_export_command_writes_a_timm_folder_with_the_runs_preprocessing(run_dir, tmp_path):
    from dinokit.config import from_dict
    from dinokit.train.build import build_multicrop_config
    from dinokit.weights import read_file

    assert main(["export", "--checkpoint", str(run_dir), "--output", str(tmp_path / "exp")]) == 0
    cfg = from_dict(read_file(run_dir / "checkpoints" / "last.ckpt")["dinokit"]["config"])
    mc = build_multicrop_config(cfg)
    hub = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert hub["architecture"] == "vit_tiny_patch16_224" and hub["model_args"]["in_chans"] == 1
    assert hub["pretrained_cfg"]["mean"] == pytest.approx(list(mc.mean))
    assert hub["pretrained_cfg"]["std"] == pytest.approx(list(mc.std))
    assert hub["pretrained_cfg"]["input_size"] == [1, mc.global_size, mc.global_size]
    from dinokit.cli._common import load

    trained = load(str(run_dir)).backbone
    model = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True).eval()
    loaded = dinokit.load_backbone(tmp_path / "exp")
    assert loaded.preprocessing["mean"] == pytest.approx(list(mc.mean))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = trained(x).cls
        torch.testing.assert_close(model.forward_features(x)[:, 0], ref, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x).cls, ref, rtol=0, atol=0)


def test_export_of_a_checkpoint_whose_weights_do_not_match_its_config_fails(run_dir, tmp_path, capsys):
    obj = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    kwargs = obj["dinokit"]["config"]["backbone"]["kwargs"]
    kwargs["embed_dim"] = int(kwargs.get("embed_dim", 32)) + 16  # the config now says another width
    bad = tmp_path / "bad.ckpt"
    torch.save(obj, bad)
    assert main(["export", "--checkpoint", str(bad), "--output", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "does not fit" in err and "shape mismatches" in err and "Traceback" not in err
    assert not list(tmp_path.glob("out*"))  # nothing half-written
