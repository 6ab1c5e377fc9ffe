"""Interrupt-and-resume reaches the same weights as an uninterrupted run (CPU, same seed).

The run is killed mid-epoch right after a step checkpoint; resuming from it must restore the
optimiser, schedules, centre, EMA teacher, RNG and the data position, so that the final student,
teacher and centre equal those of a run that was never interrupted.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import step_settings
from dinokit import DINO, build_backbone
from dinokit.train import DINOModule
from dinokit.train.loader import ResumableDataLoader, SeededViews

N_IMAGES, BATCH, EPOCHS = 48, 8, 2  # 6 steps per epoch, 12 in all


def _views(img: torch.Tensor) -> dict:
    """A tiny random augmentation: the crops depend on the torch RNG."""
    shift = int(torch.randint(0, 8, ()))
    g = [torch.roll(img, shift, dims=-1), img + 0.1 * torch.randn_like(img)]
    local = torch.nn.functional.interpolate(img[None], size=16, mode="bilinear")[0]
    return {"global_views": g, "local_views": [local + 0.1 * torch.randn_like(local)]}


def _collate(items: list) -> dict:
    views = [v for v, _ in items]
    stack = lambda key, i: torch.stack([v[key][i] for v in views])  # noqa: E731
    return {
        "global_views": [stack("global_views", i) for i in range(2)],
        "local_views": [stack("local_views", 0)],
        "labels": torch.tensor([y for _, y in items]),
        "masks": None,
    }


class Crash(Callback):
    """Stops the run abruptly at optimiser step ``at``; Lightning runs checkpoint callbacks last,
    so the newest checkpoint on disk is the one of step ``at - 1`` (step 8 here)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def _run(tmp_path, *, crash_at=None, resume=None):
    pl.seed_everything(0, verbose=False)
    backbone = build_backbone(
        "vit_tiny_patch16_224",
        encoder_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2,
                            drop_path_rate=0.1),
    )
    method = DINO(backbone, projector_hidden_dim=32, projector_bottleneck_dim=16, n_prototypes=32)
    module = DINOModule(method, step_settings(lr=0.01, warmup_epochs=1, freeze_last_layer_epochs=1))
    data = list(torch.rand(N_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    loader = ResumableDataLoader(SeededViews(data, _views, seed=3), batch_size=BATCH, seed=3,
                                 collate_fn=_collate)
    callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1,
                                 filename="s{step}", auto_insert_metric_name=False)]
    if crash_at:
        callbacks.append(Crash(crash_at))
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, ckpt_path=resume, weights_only=True)
    return method


def test_resume_mid_epoch_matches_uninterrupted(tmp_path):
    reference = _run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "b", crash_at=9)  # epoch 1, step 3 of 6
    ckpt = tmp_path / "b" / "s8.ckpt"
    assert ckpt.is_file()
    resumed = _run(tmp_path / "c", resume=str(ckpt))
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after resume")


def test_resume_differs_without_data_position(tmp_path):
    """Guard: the comparison above is sensitive — a run from the step-8 weights but a restarted
    epoch (data position lost) ends elsewhere."""
    reference = _run(tmp_path / "a")
    with pytest.raises(RuntimeError):
        _run(tmp_path / "b", crash_at=9)
    obj = torch.load(tmp_path / "b" / "s8.ckpt", weights_only=True)
    assert obj["loops"]["fit_loop"]["state_dict"].pop("combined_loader")
    torch.save(obj, tmp_path / "b" / "lost.ckpt")
    resumed = _run(tmp_path / "c", resume=str(tmp_path / "b" / "lost.ckpt"))
    teacher_a = reference.teacher_backbone.state_dict()
    teacher_b = resumed.teacher_backbone.state_dict()
    assert any(not torch.equal(teacher_a[k], teacher_b[k]) for k in teacher_a)


# ------------------------------------------------------------------ through the CLI (issue 9, 11)
TINY_CLI = [
    "data.dataset=digits", "data.limit=192", "data.batch_size=32", "data.num_workers=0",
    "trainer.epochs=2", "trainer.progress=false", "trainer.log_every_n_steps=1",
    "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, in_chans: 1}",
    "dino.n_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
    # schedules that do not depend on the run length, so a longer resumed run can be compared
    "optim.warmup_epochs=0", "optim.min_lr=0.0005", "optim.lr=0.0005", "optim.weight_decay_end=0.04",
    "teacher.momentum=0.996", "teacher.final_momentum=0.996",
]


def _cli(tmp_path, name, *extra):
    from dinokit.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["train", "--config", "demo", *TINY_CLI, f"trainer.output_dir={tmp_path}",
                     f"trainer.run_name={name}", *extra])


def _ckpt(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def test_resume_after_max_steps_continues_exactly(tmp_path):
    """A run stopped by trainer.max_steps mid-epoch, resumed with a larger max_steps, ends where
    an uninterrupted run ends: no step lost, none repeated, the epoch's remaining batches kept."""
    assert _cli(tmp_path, "ref", "trainer.max_steps=11") == 0
    assert _cli(tmp_path, "cut", "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=4") == 0
    cut = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert _ckpt(cut)["global_step"] == 8
    assert _cli(tmp_path, "cut", "trainer.max_steps=11", "trainer.resume=last",
                "trainer.checkpoint_every_n_steps=4") == 0
    a, b = _ckpt(tmp_path / "ref" / "checkpoints" / "last.ckpt"), _ckpt(cut)
    assert a["global_step"] == b["global_step"] == 11
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0, msg=f"{k} differs")


def test_last_ckpt_is_the_last_state_with_step_checkpoints(tmp_path):
    assert _cli(tmp_path, "s", "trainer.checkpoint_every_n_steps=5") == 0
    names = sorted(p.name for p in (tmp_path / "s" / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in names and "last.ckpt" in names, names
    assert _ckpt(tmp_path / "s" / "checkpoints" / "last.ckpt")["global_step"] == 12  # not step 10
