"""Shared tiny fixtures: every test runs on the CPU in seconds (the machines have 2 shared cores)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dinokit.backbones import build_backbone
from dinokit.settings import MethodSettings, OptimSettings
from dinokit.train.step import StepSettings

torch.set_num_threads(1)

#: A 2-block ViT on 32-px images: 4x4 patches of 8 px, width 48, 2 heads.
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)


def tiny_vit(num_registers: int = 0, **kw):
    """The tiny ViT as a dinokit backbone (``dynamic_img_size=True``, so 16- and 48-px crops work)."""
    return build_backbone("vit_tiny_patch16_224", num_registers=num_registers,
                          encoder_kwargs={**TINY_VIT, **kw})


def tiny_cnn(in_chans: int = 3, width: int = 8) -> nn.Module:
    """A 2-conv CNN with BatchNorm returning a ``[B, width, H/2, W/2]`` feature map."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
    )


def settings(**sections: dict) -> MethodSettings:
    """:class:`MethodSettings` from plain dicts per section: ``settings(gram={"weight": 1.0})``."""
    base = MethodSettings()
    return dataclasses.replace(base, **{k: dataclasses.replace(getattr(base, k), **v)
                                        for k, v in sections.items()})


def step_settings(**kw) -> StepSettings:
    """:class:`StepSettings` from flat keywords: ``precision``, ``accumulate`` and
    ``max_nonfinite_steps`` for the step, the rest for its :class:`OptimSettings`."""
    own = {k: kw.pop(k) for k in ("precision", "accumulate", "max_nonfinite_steps") if k in kw}
    return StepSettings(optim=OptimSettings(**kw), **own)


def _sees_every_token(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """A forward hook that changes nothing (a hook on the final norm needs every token)."""


def full_last_block(*backbones) -> None:
    """Make ``cls_only`` calls of these ViT backbones run the full last block (the reference for
    the CLS-only path): a hook on the final norm must see every token."""
    for bb in backbones:
        bb.model.norm.register_forward_hook(_sees_every_token)


def seed_all(seed: int = 0) -> None:
    """Seed torch's global generator (model initialisation)."""
    torch.manual_seed(seed)


@pytest.fixture
def seeded():
    """Use in a test that builds models: the global generator starts from seed 0."""
    seed_all(0)


@pytest.fixture
def vit():
    seed_all(0)
    return tiny_vit()
