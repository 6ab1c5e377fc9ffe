"""DINOv2 and DINOv3 methods: contracts, loss composition, masking, registers, Gram anchoring."""

from __future__ import annotations

import pytest
import torch

from conftest import settings, tiny_vit
from dinokit import DINOv2, DINOv3, build_backbone
from dinokit.losses import ibot_patch_loss
from dinokit.weights import WeightsError

HEADS = dict(projector_hidden_dim=32, projector_bottleneck_dim=16, n_patch_prototypes=12)


def _v2(**kw):
    torch.manual_seed(0)
    m = DINOv2(tiny_vit(), n_prototypes=24, **HEADS, **kw)
    m.set_run_length(100, 10)
    return m


def _v3(**gram):
    torch.manual_seed(0)
    m = DINOv3(tiny_vit(num_registers=4), n_cls_prototypes=24, **HEADS, settings=settings(gram=gram))
    m.set_run_length(100, 10)
    return m


def _views(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)],
            [torch.randn(b, 3, 16, 16, generator=g)])


def _masks(b=4, seed=0):
    return torch.rand(2 * b, 16, generator=torch.Generator().manual_seed(seed)) < 0.4


@pytest.mark.parametrize("make", [_v2, lambda: _v3(weight=1.0)])
def test_contract_and_loss_composition(make):
    m = make()
    g, lv = _views()
    out = m(global_views=g, local_views=lv, masks=_masks())
    out.loss.backward()
    missing = [n for n, p in m.student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(p.grad is None for p in m.teacher.parameters())
    if getattr(m, "gram_teacher", None) is not None:
        assert all(p.grad is None and not p.requires_grad for p in m.gram_teacher.parameters())
    total = out.loss_cls + 1.0 * out.loss_patch + 0.1 * out.loss_koleo
    if out.loss_gram is not None:
        total = total + m.term_timings()["gram"].at(m.time.step) * out.loss_gram
    torch.testing.assert_close(out.loss.detach(), total, rtol=1e-6, atol=1e-6)
    assert out.student_logits.shape == (3, 4, 24) and out.teacher_logits.shape == (2, 4, 24)
    assert m(images=g[0]).embedding.shape == (4, 48)


def test_patch_loss_uses_masked_tokens_only():
    m = _v2()
    g, lv = _views()
    none = torch.zeros(8, 16, dtype=torch.bool)
    assert m(global_views=g, local_views=lv, masks=none).loss_patch.item() == 0.0
    masks = none.clone()
    masks[2, [1, 5, 6]] = True
    m.eval()
    out = m(global_views=g, local_views=lv, masks=masks)
    with torch.no_grad():
        t = m.teacher_backbone(torch.cat(g)).patches[masks]
        s = m.student_backbone(torch.cat(g), masks=masks).patches[masks]
        t_probs = m.term("patch").ibot_loss.teacher_probs(m.teacher["patch_head"](t), m.teacher_temperature)
        weights = torch.full((3,), 1.0 / 3)  # one crop with 3 masked tokens
        # Official normalisation: summed over the masked tokens, divided by ALL 8 global crops.
        want = ibot_patch_loss(m.student["patch_head"](s), t_probs, weights, 8, 0.1)
    torch.testing.assert_close(out.loss_patch, want)


def test_few_steps_lower_the_loss():
    for make in (_v2, lambda: _v3(weight=0.5)):
        m = make()
        m.set_run_length(40, 10)
        opt = torch.optim.AdamW(m.student_parameters(), lr=3e-3)
        g, lv = _views(b=8)
        masks = _masks(b=8)
        losses = []
        for _ in range(25):
            out = m(global_views=g, local_views=lv, masks=masks)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            m.update_teacher()
            losses.append(out.loss.item())
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


def test_registers_change_sequence_not_patches():
    m = _v3()
    assert m.student_backbone.num_registers == 4
    g, _ = _views()
    out = m.teacher_backbone(g[0])
    assert out.patches.shape == (4, 16, 48) and out.registers.shape == (4, 4, 48)
    assert m.teacher_backbone.last_self_attention(g[0]).shape[-1] == 1 + 4 + 16


def test_gram_anchoring():
    m = _v3(weight=2.0, start_step=2, ramp_steps=2)
    none = torch.zeros(8, 16, dtype=torch.bool)
    g, lv = _views()
    assert m(global_views=g, local_views=lv, masks=none).loss_gram is None  # weight 0 before step 2
    assert m.term_timings()["gram"].at(3) == pytest.approx(1.0)  # ramped half-way
    m.time.step = 10
    m.eval()
    out = m(global_views=g, local_views=lv, masks=none)
    assert out.loss_gram.item() == pytest.approx(0.0, abs=1e-10)  # student == snapshot
    with torch.no_grad():
        for p in m.student_backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert m(global_views=g, local_views=lv, masks=none).loss_gram > 0
    r = _v3(weight=1.0, refresh_every=2)
    with torch.no_grad():
        for p in r.student_backbone.parameters():
            p.add_(1.0)
    before = r.gram_teacher.model.cls_token.clone()
    r.update_teacher(0.0)
    assert torch.equal(r.gram_teacher.model.cls_token, before)  # step 1: no refresh
    r.update_teacher(0.0)
    assert torch.equal(r.gram_teacher.model.cls_token, r.teacher_backbone.model.cls_token)  # step 2


def test_gram_teacher_from_file_and_wrong_architecture(tmp_path):
    m = _v3(weight=1.0)
    other = tiny_vit(num_registers=4, depth=3)
    path = tmp_path / "gram.pt"
    torch.save({k: v for k, v in other.state_dict().items()}, path)
    with pytest.raises(WeightsError, match="unexpected keys"):
        m.load_gram_teacher(path)
    same = tiny_vit(num_registers=4)
    torch.save(same.state_dict(), path)
    m.load_gram_teacher(path)
    torch.testing.assert_close(m.gram_teacher.model.cls_token, same.model.cls_token)


def test_bad_inputs():
    with pytest.raises(TypeError, match="needs a ViT with a CLS token|need patch tokens|mask token"):
        DINOv2(build_backbone("resnet18"), **HEADS)
    with pytest.raises(ValueError, match="mask_ratio"):
        _v2(mask_ratio=1.5)
    with pytest.raises(ValueError, match="masks must be bool"):
        _v2()(global_views=_views()[0], masks=torch.zeros(8, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="CLS token"):
        DINOv2(tiny_vit(class_token=False, global_pool="avg"), **HEADS)
    with pytest.raises(ValueError, match="n_register_tokens"):
        _v2(n_register_tokens=-1)
