"""The DINO method module: gradients reach the student only, shapes as documented, the batched
multi-crop forward equals crop-by-crop, step hooks, state, and clear errors for bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import dinokit
from conftest import tiny_vit
from dinokit import DINO


def _model(**kw):
    torch.manual_seed(0)
    return DINO(tiny_vit(), projector_hidden_dim=32, projector_bottleneck_dim=16, n_prototypes=24, **kw)


def _views(b=3, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)],
            [torch.randn(b, 3, 16, 16, generator=g) for _ in range(n_local)])


def test_student_gets_every_gradient_teacher_none():
    m = _model()
    g, lv = _views()
    out = m(global_views=g, local_views=lv)
    out.loss.backward()
    missing = [n for n, p in m.student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(not p.requires_grad and p.grad is None for p in m.teacher.parameters())
    assert out.teacher_logits.shape == (2, 3, 24) and out.student_logits.shape == (4, 3, 24)
    assert out.embedding.shape == (6, 48) and torch.isfinite(out.loss)
    assert set(out) >= {"loss", "embedding", "teacher_logits", "student_logits", "teacher_entropy"}
    assert out["loss"] is out.loss


def test_images_path_returns_teacher_embedding_without_grad():
    m = _model()
    x = torch.randn(5, 3, 32, 32)
    out = m(images=x)
    assert out.embedding.shape == (5, 48) and out.loss.item() == 0.0
    assert not out.embedding.requires_grad
    torch.testing.assert_close(out.embedding, m.teacher_backbone(x).cls)


def test_batched_forward_equals_crop_by_crop():
    m = _model()
    m.eval()
    g, lv = _views()
    out = m(global_views=g, local_views=lv)
    one_by_one = torch.stack([m.student_head(m.student_backbone(v).cls) for v in g + lv])
    torch.testing.assert_close(out.student_logits, one_by_one, atol=1e-5, rtol=1e-4)
    teacher = torch.stack([m.teacher_head(m.teacher_backbone(v).cls) for v in g])
    torch.testing.assert_close(out.teacher_logits, teacher, atol=1e-5, rtol=1e-4)


def test_teacher_sees_only_global_crops():
    m = _model()
    seen = []
    m.teacher_backbone.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    m(global_views=_views()[0], local_views=_views()[1])
    assert seen == [torch.Size([6, 3, 32, 32])]


def test_loss_uses_the_old_centre_then_updates_it():
    m = _model()
    g, lv = _views()
    old = m.dino_loss.center.clone()
    out = m(global_views=g, local_views=lv)
    probs = torch.softmax((out.teacher_logits - old) / m.teacher_temperature, -1)
    expected = m.dino_loss(out.student_logits, probs)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(m.dino_loss.center, 0.1 * out.teacher_logits.mean((0, 1)))
    m.eval()
    frozen = m.dino_loss.center.clone()
    m(global_views=g, local_views=lv)
    assert torch.equal(m.dino_loss.center, frozen)  # no centre update in eval


def test_step_hooks_follow_the_schedules():
    m = _model(total_steps=10, warmup_epochs_temperature_teacher=4)
    assert m.teacher_temperature == pytest.approx(0.04)
    m.set_epoch(2)
    assert m.teacher_temperature == pytest.approx(0.055)
    m.set_epoch(4)
    assert m.teacher_temperature == pytest.approx(0.07)
    assert m.update_teacher() == pytest.approx(0.996) and m.step == 1
    for _ in range(4):
        m.update_teacher()
    assert m.momentum() == pytest.approx(0.998)  # half-way through the cosine
    assert m.update_teacher(0.5) == 0.5


def test_state_round_trip_with_weights_only():
    m = _model(total_steps=20)
    m(global_views=_views()[0])
    m.update_teacher()
    m.set_epoch(3)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = _model()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert (other.step, other.epoch, other.total_steps) == (1, 3, 20)
    torch.testing.assert_close(other.dino_loss.center, m.dino_loss.center)
    m.eval()
    other.eval()
    g, lv = _views(seed=1)
    torch.testing.assert_close(other(global_views=g, local_views=lv).loss,
                               m(global_views=g, local_views=lv).loss)


def test_zero_local_crops_and_cnn_backbone():
    m = _model()
    assert torch.isfinite(m(global_views=_views()[0], local_views=[]).loss)
    cnn = DINO(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), projector_hidden_dim=16,
               projector_bottleneck_dim=8, n_prototypes=10, projector_batch_norm=True)
    out = cnn(global_views=_views()[0], local_views=_views()[1])
    out.loss.backward()
    assert out.student_logits.shape == (4, 3, 10)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(global_views=[torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]), ValueError,
         r"global_views\[1\] has batch size 3"),
        (dict(global_views=[torch.randn(2, 3, 32, 32)], local_views=[torch.randn(4, 3, 16, 16)]),
         ValueError, r"local_views\[0\] has batch size 4"),
        (dict(global_views=[]), ValueError, "global_views is empty"),
        (dict(global_views=None), ValueError, "global_views is required"),
        (dict(global_views=torch.randn(2, 3, 32, 32)), TypeError, "wrap it in a list"),
        (dict(global_views=[torch.randn(2, 4, 32, 32)] * 2), ValueError, "4 channels"),
        (dict(global_views=[torch.randn(3, 32, 32)] * 2), ValueError,
         r"global_views\[0\] must be \[B, C, H, W\]"),
        (dict(global_views=["x", "y"]), TypeError, r"global_views\[0\] must be a torch.Tensor"),
    ],
)
def test_bad_views_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        _model()(**kwargs)


def test_non_finite_inputs_are_reported():
    g = [torch.full((2, 3, 32, 32), float("nan"))] * 2
    with pytest.raises(ValueError, match="non-finite"):
        _model()(global_views=g)


def test_backbone_without_usable_embedding():
    class Nothing(nn.Module):
        def forward(self, x):
            return (x,)

    with pytest.raises(TypeError, match="returned tuple"):
        DINO(Nothing())


@pytest.mark.slow
def test_seed_000_example():
    """Seed 000's usage example, with this package's import path (batch 2 instead of 8 for CI)."""
    model = dinokit.DINO("vit_small_patch16_224", encoder_kwargs={"dynamic_img_size": True},
                         n_prototypes=4096)
    global_views = [torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224)]
    local_views = [torch.randn(2, 3, 96, 96) for _ in range(6)]
    out = model(global_views=global_views, local_views=local_views)
    out.loss.backward()
    assert out.student_logits.shape == (8, 2, 4096) and out.teacher_logits.shape == (2, 2, 4096)
    assert all(p.grad is not None for p in model.student_backbone.parameters())
