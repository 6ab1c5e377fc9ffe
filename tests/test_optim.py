"""Parameter groups, clipping and the per-step schedules of the training engine."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from conftest import settings, step_settings
from dinokit import DINO, build_backbone
from dinokit.train import DINOModule
from dinokit.train.optim import (
    LARS,
    build_optimizer,
    clip_per_parameter_,
    is_fused,
    layer_id,
    param_groups,
    set_group_hyperparameters,
    skip_step_if_,
)


def _tiny_dino(**kw):
    backbone = build_backbone(
        "vit_tiny_patch16_224",
        encoder_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2),
    )
    return DINO(backbone, projector_hidden_dim=32, projector_bottleneck_dim=16, n_prototypes=16, **kw)


def test_no_weight_decay_on_biases_norms_and_tokens():
    method = _tiny_dino()
    groups = param_groups(method.student.named_parameters())
    decayed = {n for g in groups if g["wd_scale"] == 1.0 for n in g["names"]}
    free = {n for g in groups if g["wd_scale"] == 0.0 for n in g["names"]}
    assert "backbone.model.blocks.0.attn.qkv.weight" in decayed
    assert "head.mlp.0.weight" in decayed
    for name in ("backbone.model.blocks.0.attn.qkv.bias", "backbone.model.blocks.0.norm1.weight",
                 "backbone.model.cls_token", "backbone.model.pos_embed", "head.mlp.0.bias"):
        assert name in free, name
    # the fixed weight-norm gain is frozen and so in no group at all
    assert "head.last_layer.weight_g" not in decayed | free
    assert not {n for g in param_groups(method.student.named_parameters(),
                                        exclude_bias_and_norm_wd=False) for n in g["names"]
                if g["wd_scale"] == 0.0}


def test_layer_decay_and_patch_embed_multiplier():
    assert layer_id("backbone.model.patch_embed.proj.weight", 12) == 0
    assert layer_id("backbone.model.blocks.3.mlp.fc1.weight", 12) == 4
    assert layer_id("head.mlp.0.weight", 12) == 13
    method = _tiny_dino()
    groups = param_groups(method.student.named_parameters(), layer_decay=0.5, n_blocks=2,
                          patch_embed_lr_mult=0.2)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.mlp.0.weight"] == 1.0
    assert scale["backbone.model.blocks.1.attn.qkv.weight"] == 0.5
    assert scale["backbone.model.blocks.0.attn.qkv.weight"] == 0.25
    assert scale["backbone.model.cls_token"] == 0.125
    assert scale["backbone.model.patch_embed.proj.weight"] == pytest.approx(0.125 * 0.2)


def test_per_parameter_clipping_matches_definition():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> scaled to norm 2
    b.grad = torch.tensor([0.6, 0.8])       # norm 1 -> unchanged
    clip_per_parameter_([a, b], 2.0)
    torch.testing.assert_close(a.grad, torch.tensor([1.2, 1.6, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.6, 0.8]))


def test_optimizer_choices_and_lars_trust_ratio():
    p = nn.Parameter(torch.ones(2, 2))
    groups = [{"params": [p]}]
    assert isinstance(build_optimizer("adamw", groups), torch.optim.AdamW)
    assert isinstance(build_optimizer("sgd", [{"params": [p]}]), torch.optim.SGD)
    with pytest.raises(ValueError, match="optimizer must be"):
        build_optimizer("adagrad", [{"params": [p]}])
    opt = LARS([p], lr=1.0, momentum=0.0, eta=0.1, weight_decay=0.0)
    p.grad = torch.full((2, 2), 4.0)  # ||w|| = 2, ||g|| = 8 -> update = 0.1 * 2/8 * g = 0.1
    opt.step()
    torch.testing.assert_close(p.data, torch.full((2, 2), 0.9))


def _batches(n=8, b=4):
    g = torch.Generator().manual_seed(0)
    return [{"global_views": [torch.rand(b, 3, 32, 32, generator=g) for _ in range(2)],
             "local_views": [torch.rand(b, 3, 16, 16, generator=g)], "masks": None}
            for _ in range(n)]


class Recorder(pl.Callback):
    def __init__(self):
        self.lr, self.wd, self.last_layer, self.mlp, self.momentum = [], [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        g = next(g for g in optimizer.param_groups if g["wd_scale"] == 1.0)
        self.lr.append(g["lr"])
        self.wd.append(g["weight_decay"])
        m = pl_module.method
        self.momentum.append(pl_module.step_fn.values(trainer.global_step).momentum)
        self.last_layer.append(m.student_head.last_layer.weight_v.detach().clone())
        self.mlp.append(m.student_head.mlp[0].weight.detach().clone())


def _fit(module, epochs=2, callbacks=()):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(_batches(), batch_size=None))
    return trainer


def test_schedules_are_applied_every_step():
    method = _tiny_dino()
    module = DINOModule(method, step_settings(lr=0.1, lr_reference_batch=4, warmup_epochs=1, min_lr=0.0,
                        weight_decay=0.04, weight_decay_end=0.4, freeze_last_layer_epochs=0))
    module.global_batch_size = lambda: 4  # batch_size=None loader: 4 images per step
    rec = Recorder()
    _fit(module, epochs=2, callbacks=[rec])
    total, warm = 16, 8
    expected_lr = [0.1 * s / (warm - 1) if s < warm else
                   0.5 * 0.1 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
                   for s in range(total)]
    expected_wd = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * s / total)) for s in range(total)]
    assert rec.lr == pytest.approx(expected_lr, abs=1e-9)
    assert rec.wd == pytest.approx(expected_wd, abs=1e-9)
    # EMA momentum followed its cosine and the step counter matches optimiser steps
    # EMA momentum followed the official cosine (1 - (1 - m0) (1 + cos(pi s / T)) / 2), step by step
    assert module.step_fn.clock.total_steps == total
    expected_momentum = [1 - 0.5 * (1 - 0.996) * (1 + math.cos(math.pi * s / total)) for s in range(total)]
    assert rec.momentum == pytest.approx(expected_momentum, abs=1e-12)


def test_last_layer_frozen_for_the_first_epoch_only():
    method = _tiny_dino(settings=settings(heads={"norm_last_layer": False}))
    module = DINOModule(method, step_settings(lr=0.01, warmup_epochs=0, freeze_last_layer_epochs=1))
    rec = Recorder()
    _fit(module, epochs=2, callbacks=[rec])
    # epoch 0 = steps 0..7: prototypes unchanged while the MLP moves
    assert all(torch.equal(rec.last_layer[0], w) for w in rec.last_layer[:8])
    assert not torch.equal(rec.mlp[0], rec.mlp[7])
    assert not torch.equal(rec.last_layer[8], method.student_head.last_layer.weight_v)


def test_one_nan_batch_is_skipped_and_training_goes_on():
    """A single non-finite step no longer stops the run: it is skipped on the device (see
    tests/test_nonfinite_guard.py for the state checks and the stop after K in a row)."""
    method = _tiny_dino()
    module = DINOModule(method, step_settings(lr=0.01))
    bad = _batches(2)
    bad[0]["global_views"][0][0, 0, 0, 0] = float("nan")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(bad, batch_size=None))
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_build_optimizer_uses_fused_kernels_where_torch_has_them():
    p = nn.Parameter(torch.ones(2, 2))
    for name in ("adamw", "adam", "sgd"):
        opt = build_optimizer(name, [{"params": [p]}])
        assert opt.defaults.get("fused") is True, name  # CPU fused kernels (torch >= 2.4)
        assert not build_optimizer(name, [{"params": [p]}], fused=False).defaults.get("fused")


def _adamw_pair(fused):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3, 2))
    opt = build_optimizer("adamw", [{"params": [p], "lr": 0.1, "weight_decay": 0.05}], fused=fused)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.1, 0.05
    return p, opt


@pytest.mark.parametrize("fused", [True, False])
def test_skip_step_if_leaves_parameters_and_state_unchanged_on_the_device(fused):
    p, opt = _adamw_pair(fused)
    p.grad = torch.ones_like(p)
    opt.step()  # some history: moments and a step count
    state = {k: v.clone() for k, v in opt.state[p].items()}
    before = p.detach().clone()
    p.grad = torch.full_like(p, float("nan"))
    skip_step_if_(opt, torch.tensor(True))
    assert torch.equal(p, before)
    for k, v in opt.state[p].items():
        assert torch.equal(v, state[k]), k
    assert not hasattr(opt, "found_inf")
    # found_inf False: exactly the plain step
    q, ref = _adamw_pair(fused)
    q.grad = torch.ones_like(q)
    ref.step()
    q.grad = torch.full_like(q, 0.5)
    ref.step()
    p.grad = torch.full_like(p, 0.5)
    skip_step_if_(opt, torch.tensor(False))
    torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_skip_step_if_on_a_first_step_resets_new_state():
    p = nn.Parameter(torch.ones(2))
    opt = LARS([p], lr=0.1)
    p.grad = torch.ones(2)
    skip_step_if_(opt, torch.tensor(True))
    assert torch.equal(p, torch.ones(2)) and torch.equal(opt.state[p]["mu"], torch.zeros(2))


def test_last_layer_lr_multiplier_freezes_flagged_groups():
    method = _tiny_dino(settings=settings(heads={"norm_last_layer": False}))
    groups = param_groups(method.student.named_parameters())  # official: names with "last_layer"
    flagged = {n for g in groups if g["is_last_layer"] for n in g["names"]}
    assert flagged == {"head.last_layer.weight_v", "head.last_layer.weight_g"}
    opt = build_optimizer("adamw", groups)
    set_group_hyperparameters(opt, lr=0.1, weight_decay=0.04, last_layer_lr=0.0)
    assert {g["lr"] for g in opt.param_groups if g["is_last_layer"]} == {0.0}
    assert {g["lr"] for g in opt.param_groups if not g["is_last_layer"]} == {0.1}


def test_bad_no_decay_rule_is_named():
    with pytest.raises(ValueError, match="no_decay_rule"):
        param_groups([("w", nn.Parameter(torch.ones(2, 2)))], no_decay_rule="timm")


def test_a_loaded_state_dict_does_not_change_the_kernel_choice():
    """A checkpoint from a foreach run (e.g. FSDP2) loaded into a fused optimiser keeps it fused."""
    from dinokit.train.optim import align_kernel_flags

    p = nn.Parameter(torch.ones(2, 2))
    saved = build_optimizer("adamw", [{"params": [p]}], fused=False).state_dict()
    opt = build_optimizer("adamw", [{"params": [p]}])
    opt.load_state_dict(saved)
    assert not is_fused(opt)  # the loaded groups say foreach: found_inf would be refused
    align_kernel_flags(opt)
    assert is_fused(opt)
    p.grad = torch.ones(2, 2)
    skip_step_if_(opt, torch.tensor(True))  # the device-side skip works again
    assert torch.equal(p, torch.ones(2, 2))
