"""Shared tiny fixtures: every test runs on the CPU in seconds."""

from __future__ import annotations

import pytest
import torch

from dinokit.backbones import build_backbone

torch.set_num_threads(1)

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)


def tiny_vit(num_registers: int = 0, **kw):
    """A 2-block ViT on 32-px images (4x4 patches of 8 px), built in milliseconds."""
    return build_backbone("vit_tiny_patch16_224", num_registers=num_registers,
                          encoder_kwargs={**TINY_VIT, **kw})


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return tiny_vit()
