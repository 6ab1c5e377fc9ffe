"""The real CLI on a tiny model for a few steps: losses equal the stored golden values (a silent
change of the training loop shows up here in seconds), plus run-level bad inputs and resume."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.viz.curves import read_metrics

GOLDEN = Path(__file__).parent / "golden" / "demo_digits_losses.json"
TINY = [
    "data.dataset=digits", "data.limit=192", "data.batch_size=32", "data.num_workers=0",
    "trainer.epochs=2", "trainer.progress=false", "trainer.log_every_n_steps=1",
    "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, in_chans: 1}",
    "dino.n_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
    "backbone.init=timm",  # the golden losses were stored with timm's ViT initialisation
]


def _losses(run_dir: Path) -> list[float]:
    return [v for _, v in read_metrics(run_dir)["train/loss"]]


def _train(tmp_path, name, *extra):
    args = ["train", "--config", "demo", *TINY, f"trainer.output_dir={tmp_path}", f"trainer.run_name={name}"]
    return main([*args, *extra])


def test_golden_losses(tmp_path):
    assert _train(tmp_path, "golden") == 0
    run = tmp_path / "golden"
    losses = _losses(run)
    assert len(losses) == 12  # 192 / 32 = 6 steps per epoch, 2 epochs
    if os.environ.get("DINOKIT_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(losses, indent=1))
    expected = json.loads(GOLDEN.read_text())
    assert losses == pytest.approx(expected, rel=2e-3)
    for f in ("config.yaml", "checkpoints/last.ckpt", "pictures/curves.png", "pictures/pca.png", "tb"):
        assert (run / f).exists(), f
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["dinokit"]["config"]["dino"]["n_prototypes"] == 64


def test_resume_continues_and_refuses_incompatible_changes(tmp_path, capsys):
    assert _train(tmp_path, "r") == 0
    epoch0 = tmp_path / "r" / "checkpoints" / "epoch000.ckpt"
    assert _train(tmp_path, "r", f"trainer.resume={epoch0}") == 0  # redo epoch 1 from the checkpoint
    resumed = _losses(tmp_path / "r")
    assert len(resumed) == 12  # the first epoch's log survives the resume
    golden = json.loads(GOLDEN.read_text())
    assert resumed == pytest.approx(golden, rel=2e-3)  # and the run continues exactly
    with pytest.warns(UserWarning, match="schedules"):
        assert _train(tmp_path, "r", "trainer.epochs=3", "trainer.resume=last") == 0
    assert _train(tmp_path, "r", "trainer.resume=last", "dino.n_prototypes=32") == 2
    assert "dino.n_prototypes" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["data.dataset=folder", "data.path=/no/such/dir"], "does not exist"),
    (["data.batch_size=1000"], "larger than the dataset"),
    (["trainer.resume=last"], "does not exist"),
    (["model.init_weights=/no/such/file.safetensors"], "does not exist"),
])
def test_bad_runs_fail_before_training(tmp_path, capsys, extra, message):
    assert _train(tmp_path, "bad", *extra) == 2
    assert message in capsys.readouterr().err


def test_init_weights_from_another_architecture_names_the_keys(tmp_path, capsys):
    assert _train(tmp_path, "src", "trainer.epochs=1") == 0
    ckpt = tmp_path / "src" / "checkpoints" / "last.ckpt"
    other = ["backbone.kwargs={img_size: 28, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2, "
             "in_chans: 1}", f"model.init_weights={ckpt}"]
    assert _train(tmp_path, "dst", *other) == 2
    assert "missing keys" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["dinov2_tiny_cpu", "dinov3_tiny_cpu"])
def test_dinov2_and_dinov3_presets_train_through_the_cli(tmp_path, preset):
    args = ["train", "--config", preset, "data.dataset=digits", "data.limit=128", "data.batch_size=32",
            "data.num_workers=0", "trainer.progress=false", "trainer.log_every_n_steps=1",
            f"trainer.output_dir={tmp_path}", "trainer.run_name=r"]
    assert main(args) == 0
    metrics = read_metrics(tmp_path / "r")
    for key in ("train/loss_cls", "train/loss_patch", "train/loss_koleo"):
        assert len(metrics[key]) == 4, key
    if preset.startswith("dinov3"):
        ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)
        assert any(".gram_teacher." in k for k in ckpt["state_dict"])  # saved for resume


def test_online_knn_monitor_logs_accuracy(tmp_path):
    assert _train(tmp_path, "knn", "trainer.knn_every_n_epochs=1", "data.val_limit=64") == 0
    knn = read_metrics(tmp_path / "knn")["val/knn_top1"]
    assert len(knn) == 2 and all(0 <= v <= 100 for _, v in knn)


def test_unreadable_images_are_counted_at_the_end(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.new("L", (28, 28), i * 5).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"no image")
    args = ["train", "--config", "demo", *TINY, "data.dataset=folder", f"data.path={folder}",
            "data.limit=null", f"trainer.output_dir={tmp_path}", "trainer.run_name=f", "trainer.epochs=1"]
    with pytest.warns(UserWarning, match="1 unreadable image"):
        assert main(args) == 0


def test_a_run_started_from_init_weights_loads_and_resumes_after_the_file_is_gone(tmp_path):
    import shutil

    from dinokit.cli._common import load

    assert _train(tmp_path, "first", "trainer.epochs=1") == 0
    init = tmp_path / "init.ckpt"
    shutil.copy(tmp_path / "first" / "checkpoints" / "last.ckpt", init)
    assert _train(tmp_path, "second", "trainer.epochs=1", f"model.init_weights={init}") == 0
    init.unlink()  # the start-up file is gone: evaluation and resume must not read it again
    loaded = load(str(tmp_path / "second"))
    assert loaded.backbone(torch.zeros(1, 1, 28, 28)).cls.shape == (1, 32)
    assert _train(tmp_path, "second", "trainer.epochs=2", f"model.init_weights={init}",
                  "trainer.resume=last") == 0


def test_batched_device_augmentation_trains_through_the_cli(tmp_path):
    """data.augment_on=device: the loader yields uint8 images and the module crops them batched."""
    assert _train(tmp_path, "dev", "trainer.epochs=1", "data.augment_on=device") == 0
    losses = _losses(tmp_path / "dev")
    assert len(losses) == 6 and all(v == v for v in losses)


def test_a_run_shows_no_lightning_noise(tmp_path):
    """Lightning's product tips and warnings about dinokit's own set-up (here DINOv3's frozen Gram
    teacher in eval mode) stay out of the output; its informative lines (the accelerator) stay in."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning.pytorch").addHandler(handler)
    args = ["train", "--config", "dinov3_tiny_cpu", "data.dataset=digits", "data.limit=64", "data.batch_size=32",
            "data.num_workers=0", "trainer.progress=false", f"trainer.output_dir={tmp_path}", "trainer.run_name=r"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(args) == 0
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    assert any("GPU available" in m for m in seen)
    assert not [m for m in seen if "Tip" in m]
    noise = ("LeafSpec", "validation_step", "many workers", "eval mode")
    assert not [str(w.message) for w in caught if any(n in str(w.message) for n in noise)]


@pytest.mark.parametrize(("keep", "kept"), [(-1, [2, 4, 6]), (2, [4, 6])])
def test_step_checkpoints_keep_the_newest_and_a_short_run_is_quiet(tmp_path, keep, kept):
    """``trainer.keep_checkpoints`` step checkpoints stay (-1: all); neither Lightning's code
    sample about step checkpoints under manual optimisation nor a "curves not drawn" warning for
    a run too short to log (6 steps, logging every 50) shows up."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _train(tmp_path, "k", "trainer.epochs=1", "trainer.checkpoint_every_n_steps=2",
                      f"trainer.keep_checkpoints={keep}", "trainer.log_every_n_steps=50") == 0
    steps = sorted(int(p.stem[4:]) for p in (tmp_path / "k" / "checkpoints").glob("step*.ckpt"))
    assert steps == kept
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "manual optimization" in m or "curves not drawn" in m], messages


def test_a_run_without_a_patch_grid_draws_no_pca_maps(tmp_path):
    """PCA maps need patch tokens on a grid (a ViT); a CNN run draws its curves only."""
    cnn = ["train", "--config", "demo_cnn", "data.dataset=digits", "data.limit=64", "data.batch_size=32",
           "data.num_workers=0", "trainer.epochs=1", "trainer.progress=false", "trainer.log_every_n_steps=1",
           "backbone.kwargs={in_chans: 1}", "dino.n_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
           f"trainer.output_dir={tmp_path}", "trainer.run_name=cnn"]
    assert main(cnn) == 0
    assert (tmp_path / "cnn" / "pictures" / "curves.png").exists()
    assert not (tmp_path / "cnn" / "pictures" / "pca.png").exists()
