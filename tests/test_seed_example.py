"""Seed 000's usage example, written exactly as a user would with this package: a ViT-S/16 at
224 px, two 224-px global crops and six 96-px local crops, default head (65536 prototypes)."""

from __future__ import annotations

import pytest
import torch

import dinokit


@pytest.mark.slow
def test_seed_000_example():
    torch.manual_seed(0)
    model = dinokit.DINO("vit_small_patch16_224", encoder_kwargs={"dynamic_img_size": True})
    batch = 2  # the example uses 8; 2 keeps CI fast and exercises the same code
    global_views = [torch.randn(batch, 3, 224, 224), torch.randn(batch, 3, 224, 224)]
    local_views = [torch.randn(batch, 3, 96, 96) for _ in range(6)]

    out = model(global_views=global_views, local_views=local_views)
    out.loss.backward()

    assert torch.isfinite(out.loss)
    assert out.student_logits.shape == (8, batch, 65536) and out.teacher_logits.shape == (2, batch, 65536)
    assert out.embedding.shape == (2 * batch, 384)
    missing = [n for n, p in model.student_backbone.named_parameters() if p.grad is None]
    assert missing == []
