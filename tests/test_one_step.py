"""One training step behind every front door.

The Lightning module, the plain trainer and the scikit-learn estimator all run
:class:`~dinokit.train.step.TrainingStep`: trained on the same batches from the same initial
weights with the same settings, they end with the same student, teacher and centre. Gradient
accumulation over two half batches is the step on the full batch (one centre update per step).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import settings, tiny_vit
from dinokit.estimator import DINOEstimator
from dinokit.methods.dino import DINO
from dinokit.settings import OptimSettings
from dinokit.train import DINOModule, DINOTrainer
from dinokit.train.step import StepSettings, TrainingStep, build_method_optimizer

EPOCHS, N_BATCHES, B = 2, 3, 4
LR, WD, CLIP, FREEZE = 0.01, 0.05, 0.5, 1
# The estimator's DINO (seed 003's argument names mapped onto DINO's).
HEAD = dict(projector_hidden_dim=32, projector_bottleneck_dim=16, n_prototypes=24)
TEMPS = dict(temperature_student=0.1, temperature_teacher_warmup=0.04, temperature_teacher=0.07,
             warmup_epochs_temperature_teacher=1, ema_decay_start=0.9, ema_decay_end=1.0)
OPTIM = OptimSettings(lr=LR, lr_scaling="none", lr_schedule="constant", weight_decay=WD, weight_decay_end=WD,
                      clip_grad=CLIP, clip_mode="global", freeze_last_layer_epochs=FREEZE)


def _batches(n=N_BATCHES, b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"global_views": [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)],
             "local_views": [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]} for _ in range(n)]


def _method(encoder, batch_norm=True):
    pl.seed_everything(0, verbose=False)  # what the estimator does before building its DINO
    return DINO(copy.deepcopy(encoder), **HEAD, **TEMPS,
                settings=settings(heads={"batch_norm": batch_norm, "norm_last_layer": True}))


def _state(method):
    return {k: v.detach().clone() for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}


def _lightning(encoder, batches):
    method = _method(encoder)
    module = DINOModule(method, StepSettings(optim=OPTIM))
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(batches, batch_size=None))
    return _state(method)


def _plain(encoder, batches):
    method = _method(encoder)
    DINOTrainer(method, batches, settings=StepSettings(optim=OPTIM), epochs=EPOCHS, device="cpu").fit()
    return _state(method)


def _estimator(encoder, batches):
    est = DINOEstimator(encoder, proj_hidden_dim=32, proj_bottleneck_dim=16, proj_output_dim=24,
                        num_local_crops=2, student_temperature=0.1, teacher_temperature=0.07,
                        warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=1, base_lambda=0.9,
                        final_lambda=1.0, clip_grad=CLIP, freeze_last_layer=FREEZE, optimizer="adamW",
                        learning_rate=LR, weight_decay=WD, lr_scheduler="none", random_state=0,
                        batch_size=B, max_epochs=EPOCHS, accelerator="cpu", enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(DataLoader(batches, batch_size=None))
    return _state(est.method_)


def test_the_three_front_doors_train_identically():
    encoder, batches = tiny_vit(), _batches()
    start = _state(_method(encoder))
    states = {"lightning": _lightning(encoder, batches), "plain": _plain(encoder, batches),
              "estimator": _estimator(encoder, batches)}
    ref = states["lightning"]
    moved = [k for k in ref if ref[k].is_floating_point() and not torch.equal(ref[k], start[k])]
    # the student, the EMA teacher and the centre all moved
    assert any(k.startswith("student.") for k in moved) and any(k.startswith("teacher.") for k in moved)
    assert any(k.endswith("center") for k in moved)
    for door in ("plain", "estimator"):
        assert states[door].keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(states[door][k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{door}: {k}")


def _run_steps(encoder, batches, accumulate, dtype=torch.float32):
    method = _method(encoder, batch_norm=False).to(dtype)  # BatchNorm would see half batches
    opt = build_method_optimizer(method, OPTIM)
    step = TrainingStep(method, opt, StepSettings(optim=OPTIM, accumulate=accumulate))
    step.plan(total_steps=len(batches) // accumulate, steps_per_epoch=len(batches) // accumulate,
              global_batch=B)
    for i, batch in enumerate(batches):
        batch = {k: [v.to(dtype) for v in views] for k, views in batch.items()}
        step(batch, step=i // accumulate, epoch=1, micro=i % accumulate)
    return method


def _halves(batch):
    def split(views):
        return [v[: B // 2] for v in views], [v[B // 2:] for v in views]

    g1, g2 = split(batch["global_views"])
    l1, l2 = split(batch["local_views"])
    return [{"global_views": g1, "local_views": l1}, {"global_views": g2, "local_views": l2}]


def test_accumulating_two_half_batches_is_one_step_on_the_full_batch():
    full = _batches(n=2)
    halves = [h for b in full for h in _halves(b)]
    encoder = tiny_vit()
    # in float64, so that only the order of the sums (2 vs 4 samples) differs, far below the
    # tolerance: AdamW's normalisation would otherwise lift fp32 rounding of tiny gradients
    one, acc = (_run_steps(encoder, full, 1, torch.float64), _run_steps(encoder, halves, 2, torch.float64))
    a, b = _state(one), _state(acc)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
    assert a["terms.0.dino_loss.centering.center"].abs().sum() > 0  # the centre moved


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_runs_the_forward_under_autocast_and_trains(precision):
    method = _method(tiny_vit())
    optim = dataclasses.replace(OPTIM, freeze_last_layer_epochs=0)
    opt = build_method_optimizer(method, optim)
    step = TrainingStep(method, opt, StepSettings(optim=optim, precision=precision))
    step.plan(4, 4, B)
    key = "student.backbone.model.cls_token"
    if step.scaler is not None:  # fp16: the scaler starts at 2**16, overflows, skips and halves
        before = _state(method)
        step(_batches(n=1)[0], step=0, epoch=0)
        assert step.scaler.get_scale() == 2.0 ** 15 and torch.equal(_state(method)[key], before[key])
        assert int(step.nonfinite_total) == 0  # a routine fp16 skip is not a non-finite step
        step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    before = _state(method)
    for i, batch in enumerate(_batches(n=2)):
        out = step(batch, step=i, epoch=0).output
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    assert out.student_logits.dtype == dtype  # the heads ran under autocast
    after = _state(method)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert not torch.equal(after[key], before[key])


def test_cli_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """trainer.accumulate_grad_batches=2 with data.batch_size=4 trains what data.batch_size=8 does
    (the sampler deals the same 8 images per optimiser step, crops are seeded per sample)."""
    from dinokit.cli import main

    tiny = ["--config", "demo", "data.dataset=digits", "data.limit=64", "data.num_workers=0",
            "crops.n_local=2", "trainer.epochs=1", "trainer.max_steps=3", "trainer.progress=false",
            "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, "
            "in_chans: 1}", "dino.n_prototypes=32", "heads.hidden_dim=32",
            "heads.bottleneck_dim=16", f"trainer.output_dir={tmp_path}",
            # timm's initialisation: the key bias's gradient is zero in exact arithmetic and AdamW
            # turns its float noise (summation order) into lr-sized steps once it exceeds its eps
            "backbone.init=timm"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", *tiny, "data.batch_size=8", "trainer.run_name=big"]) == 0
        assert main(["train", *tiny, "data.batch_size=4", "trainer.accumulate_grad_batches=2",
                     "trainer.run_name=acc"]) == 0
    a, b = (torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=True) for n in ("big", "acc"))
    assert a["global_step"] == b["global_step"] == 3
    for k, v in a["state_dict"].items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-4, atol=2e-5, msg=k)


def test_training_turns_on_tf32_for_fp32_matmuls_on_cuda_and_no_constructor_does(monkeypatch):
    """TF32 is a process-wide setting: the front doors turn it on when training starts on a GPU
    (here CUDA is mocked), never when an object is built; a CPU-only run leaves it alone."""
    from dinokit.train import step as step_module
    from dinokit.train import trainer as trainer_module

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        step_module.use_tf32_matmuls()
        assert torch.get_float32_matmul_precision() == ("high" if torch.cuda.is_available() else "highest")
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            step_module.use_tf32_matmuls()
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    calls = []
    monkeypatch.setattr(trainer_module, "use_tf32_matmuls", lambda: calls.append("fit"))
    method = _method(tiny_vit())
    trainer = DINOTrainer(method, _batches(n=1), settings=StepSettings(optim=OPTIM), epochs=1, device="cpu")
    TrainingStep(method, trainer.optimizer, StepSettings(optim=OPTIM))
    assert calls == []  # building changes nothing
    trainer.fit()
    assert calls == ["fit"]
