"""The non-finite guard: a step whose loss or gradients are NaN/Inf is skipped on the device (no
weight, EMA or optimiser-state change), counted, and the run stops after K consecutive ones."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

from conftest import step_settings, tiny_vit
from dinokit import DINO
from dinokit.train.module import DINOModule, NonFiniteTrainingError


def _batches(n, nan_at=(), b=4):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        views = [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)]
        local = [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]
        if i in nan_at:
            views[0][0, 0, 0, 0] = float("nan")
        out.append({"global_views": views, "local_views": local})
    return out


def _fit(batches, max_nonfinite_steps=3):
    torch.manual_seed(0)
    method = DINO(tiny_vit(), n_prototypes=24, projector_hidden_dim=32, projector_bottleneck_dim=16)
    module = DINOModule(method, step_settings(lr=1e-3, lr_scaling="none", warmup_epochs=0,
                                              freeze_last_layer_epochs=0, max_nonfinite_steps=max_nonfinite_steps))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    return module, trainer, lambda: trainer.fit(module, loader)


class Snapshot(pl.Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append(copy.deepcopy(pl_module.method.state_dict()))


def test_a_nan_step_changes_nothing_and_training_goes_on():
    _, trainer, run = _fit(_batches(4, nan_at=(2,)))
    snap = Snapshot()
    trainer.callbacks.append(snap)
    run()
    before, after = snap.states[1], snap.states[2]  # the state around the NaN batch (index 2)
    for k in before:
        if torch.is_tensor(before[k]) and before[k].is_floating_point():
            torch.testing.assert_close(after[k], before[k], msg=k)  # weights, teacher, centre
    assert all(torch.isfinite(v).all() for v in snap.states[3].values()
               if torch.is_tensor(v) and v.is_floating_point())
    assert not torch.equal(snap.states[3]["student.backbone.model.cls_token"],
                           before["student.backbone.model.cls_token"])  # the next good step trains
    opt = trainer.optimizers[0]
    steps = {int(s["step"]) for s in opt.state.values() if "step" in s}
    assert steps == {3}  # 4 batches, one skipped: the optimiser's step count did not advance there


def test_consecutive_nan_steps_stop_the_run_with_a_clear_error():
    _, _, run = _fit(_batches(6, nan_at=(1, 2, 3)))
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive training steps") as e:
        run()
    assert e.value.exit_code == 3 and "bf16" in str(e.value)
