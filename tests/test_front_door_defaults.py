"""Every Python front door trains with the method's official rules by default, as the CLI does.

The official code decays DINO's ``cls_token`` and ``pos_embed`` and DINOv2/v3's tokens (only biases,
norms and layer-scale gammas are exempt: DINO's ``utils.get_params_groups``, DINOv2/v3's
``get_params_groups_with_decay``), clips DINO per parameter and DINOv2/v3 per module, and freezes
DINO's prototypes by cancelling their gradients and DINOv2/v3's by a zero learning rate. DINOv2/v3
also scale each ViT block's learning rate by ``layerwise_decay ** (depth + 1 - layer)`` (0.9; the
patch embedding is layer 0, the blocks 1..depth) and the patch embedding's by a further 0.2
(``ssl_default_config.yaml``); DINO's ``main_dino.py`` has neither. The peak learning rate is
DINO's 0.0005 per 256 images scaled linearly, DINOv2/v3's 0.004 per 1024 scaled by the square root.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_vit
from dinokit import DINO, DINOv2, DINOv3
from dinokit.methods.ibot import IBOT
from dinokit.train import DINOModule, DINOTrainer
from dinokit.train.step import StepSettings, TrainingStep, build_method_optimizer

DEPTH = 2  # conftest.TINY_VIT
OFFICIAL_LR_SCALES = {  # method -> lr scale of (patch embedding, first block, last block, head)
    DINO: (1.0, 1.0, 1.0, 1.0),
    IBOT: (1.0, 1.0, 1.0, 1.0),
    DINOv2: (0.2 * 0.9**3, 0.9**2, 0.9, 1.0),
    DINOv3: (0.2 * 0.9**3, 0.9**2, 0.9, 1.0),
}
OFFICIAL_PEAK_LR = {  # method -> peak learning rate at a global batch of 64
    DINO: 0.0005 * 64 / 256,
    IBOT: 0.0005 * 64 / 256,
    DINOv2: 0.004 * (64 / 1024) ** 0.5,
    DINOv3: 0.004 * (64 / 1024) ** 0.5,
}
OFFICIAL = {  # method -> (clip mode, last-layer freeze)
    DINO: ("per_param", "cancel_grad"),
    IBOT: ("per_param", "cancel_grad"),
    DINOv2: ("per_module", "zero_lr"),
    DINOv3: ("per_module", "zero_lr"),
}


def _method(cls):
    torch.manual_seed(0)
    kw = dict(projector_hidden_dim=16, projector_bottleneck_dim=8)
    if cls is DINO:
        return cls(tiny_vit(), n_prototypes=8, **kw)
    if cls is DINOv3:
        return cls(tiny_vit(num_registers=4), n_cls_prototypes=8, n_patch_prototypes=8, **kw)
    return cls(tiny_vit(), n_prototypes=8, n_patch_prototypes=8, **kw)


def _wd_scale(optimizer: torch.optim.Optimizer, names: set[str]) -> dict[str, float]:
    return {n: g["wd_scale"] for g in optimizer.param_groups for n in g["names"] if n in names}


TOKENS = {"backbone.model.cls_token", "backbone.model.pos_embed"}


@pytest.mark.parametrize("cls", list(OFFICIAL), ids=lambda c: c.__name__)
def test_every_front_door_decays_the_tokens_as_the_official_code(cls):
    method = _method(cls)
    doors = {
        "build_method_optimizer": build_method_optimizer(method),
        "DINOModule": DINOModule(method).configure_optimizers(),
        "DINOTrainer": DINOTrainer(method, [None], epochs=1, device="cpu").optimizer,
    }
    for door, opt in doors.items():
        scales = _wd_scale(opt, TOKENS)
        assert scales == dict.fromkeys(TOKENS, 1.0), f"{door}: {scales}"
        biases = [g["wd_scale"] for g in opt.param_groups for n in g["names"] if n.endswith(".bias")]
        assert biases and set(biases) == {0.0}, door


@pytest.mark.parametrize("cls", list(OFFICIAL), ids=lambda c: c.__name__)
def test_the_training_step_resolves_clip_and_freeze_to_the_official_rules(cls):
    method = _method(cls)
    step = TrainingStep(method, build_method_optimizer(method), StepSettings())
    assert (step.optim.clip_mode, step.optim.freeze_last_layer_mode) == OFFICIAL[cls]
    assert DINOModule(method).settings.optim.clip_mode == "auto"  # resolved by the method, at the step


@pytest.mark.parametrize("cls", list(OFFICIAL), ids=lambda c: c.__name__)
def test_every_front_door_scales_the_learning_rate_by_layer_as_the_official_code(cls):
    method = _method(cls)
    names = ("backbone.model.patch_embed.proj.weight", "backbone.model.blocks.0.attn.qkv.weight",
             f"backbone.model.blocks.{DEPTH - 1}.attn.qkv.weight", "head.mlp.0.weight")
    doors = {
        "build_method_optimizer": build_method_optimizer(method),
        "DINOModule": DINOModule(method).configure_optimizers(),
        "DINOTrainer": DINOTrainer(method, [None], epochs=1, device="cpu").optimizer,
    }
    for door, opt in doors.items():
        scales = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
        got = tuple(next(v for n, v in scales.items() if n.endswith(name)) for name in names)
        assert got == pytest.approx(OFFICIAL_LR_SCALES[cls]), door


@pytest.mark.parametrize("cls", list(OFFICIAL), ids=lambda c: c.__name__)
def test_the_training_step_peaks_at_the_official_learning_rate(cls):
    method = _method(cls)
    step = TrainingStep(method, build_method_optimizer(method), StepSettings())
    step.plan(total_steps=100, steps_per_epoch=10, global_batch=64)
    assert step.peak_lr == pytest.approx(OFFICIAL_PEAK_LR[cls])
    # a learning rate given in the config keeps the method's scaling rule
    settings = StepSettings(optim=dataclasses.replace(StepSettings().optim, lr=0.001))
    step = TrainingStep(method, build_method_optimizer(method), settings)
    step.plan(total_steps=100, steps_per_epoch=10, global_batch=64)
    scale = 64 / 256 if cls in (DINO, IBOT) else (64 / 1024) ** 0.5
    assert step.peak_lr == pytest.approx(0.001 * scale)
