"""The DINO method (Caron et al. 2021, Algorithm 1): the student sees every crop, the teacher only
the global crops; the loss is the cross-view cross-entropy with the centred, sharpened teacher;
gradients reach the student only; the teacher is an EMA of the student; the centre is updated
*after* the loss. Checked against an independent crop-by-crop, float64 recomputation."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from conftest import seed_all, settings, tiny_cnn, tiny_vit
from dinokit import DINO

K = 64  # prototypes
HEAD = dict(projector_hidden_dim=32, projector_bottleneck_dim=16, n_prototypes=K)


def _dino(seed=0, backbone=None, total_steps=None, check_finite=True, **sections):
    seed_all(seed)
    model = DINO(tiny_vit() if backbone is None else backbone, **HEAD, settings=settings(**sections))
    model.set_run_length(total_steps)
    model.check_finite = check_finite
    return model


def _views(b=3, n_global=2, n_local=2, seed=0):
    """``n_global`` 32-px and ``n_local`` 16-px crops of a batch of ``b`` images."""
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(b, 3, 32, 32, generator=g) for _ in range(n_global)],
            [torch.randn(b, 3, 16, 16, generator=g) for _ in range(n_local)])


def reference_loss(student_logits, teacher_logits, center, tau_s, tau_t):
    """Double loop over (teacher view, student view != teacher view) pairs in float64."""
    s, t, c = student_logits.double(), teacher_logits.double(), center.double()
    terms = []
    for i in range(t.shape[0]):
        p_t = torch.softmax((t[i] - c) / tau_t, dim=-1)
        for j in range(s.shape[0]):
            if i != j:
                terms.append(-(p_t * torch.log_softmax(s[j] / tau_s, dim=-1)).sum(-1).mean())
    return torch.stack(terms).mean()


def _crop_by_crop(model, views, which="student"):
    """Logits ``[n_views, B, K]`` with the backbone and head called on one crop at a time."""
    backbone, head = (model.student_backbone, model.student_head) if which == "student" else (
        model.teacher_backbone, model.teacher_head)
    with torch.no_grad():
        return torch.stack([head(backbone(v).cls) for v in views])


@torch.no_grad()
def _perturb_student(model):
    """Make the student differ from the teacher, so that a check can tell them apart."""
    for p in model.student.parameters():
        p.add_(0.1 * torch.randn_like(p))


def test_every_student_parameter_gets_a_gradient_and_no_teacher_parameter_does():
    model = _dino()
    g, lv = _views()
    model(global_views=g, local_views=lv).loss.backward()
    frozen = [n for n, p in model.student.named_parameters() if not p.requires_grad]
    assert frozen == ["head.last_layer.weight_g"]  # norm_last_layer: the gain is fixed at 1
    no_grad = [n for n, p in model.student.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []
    for n, p in model.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, n


def test_outputs_have_the_documented_shapes():
    """B=3, 2 globals + 3 locals, K=64, D=48: teacher [2, 3, K], student [5, 3, K], embedding
    [2 * 3, D] (the teacher CLS of the globals, view-major), all finite."""
    model = _dino()
    _perturb_student(model)
    g, lv = _views(b=3, n_global=2, n_local=3)
    out = model(global_views=g, local_views=lv)
    assert out.teacher_logits.shape == (2, 3, K) and not out.teacher_logits.requires_grad
    assert out.student_logits.shape == (5, 3, K) and out.student_logits.requires_grad
    assert out.embedding.shape == (6, 48)
    assert out.loss.shape == () and out.teacher_entropy.shape == () and out.teacher_kl_uniform.shape == ()
    for name in ("loss", "embedding", "teacher_logits", "student_logits", "teacher_entropy"):
        assert torch.isfinite(out[name]).all(), name
    with torch.no_grad():
        teacher_cls = torch.cat([model.teacher_backbone(v).cls for v in g])
        student_cls = torch.cat([model.student_backbone(v).cls for v in g])
    torch.testing.assert_close(out.embedding, teacher_cls)
    assert not torch.allclose(out.embedding, student_cls, atol=1e-3)
    assert out.teacher_temperature == pytest.approx(0.04)


def test_images_give_the_teacher_embedding_without_gradient():
    """``images=``: the teacher's CLS ``[B, D]``, a zero loss, no autograd graph."""
    model = _dino()
    _perturb_student(model)
    x = torch.randn(5, 3, 32, 32)
    out = model(images=x)
    assert out.embedding.shape == (5, 48) and not out.embedding.requires_grad
    assert out.loss.item() == 0.0 and not out.loss.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out.embedding, model.teacher_backbone(x).cls)
        assert not torch.allclose(out.embedding, model.student_backbone(x).cls, atol=1e-3)


def test_batched_forward_equals_crop_by_crop_and_the_reference_loss():
    """DINO runs one backbone pass per resolution (MultiCropWrapper); that must equal calling the
    backbone and head on each crop alone (eval mode: no dropout, no centre update). Crops of three
    sizes: 2 x 32 px, 2 x 16 px, 1 x 24 px."""
    model = _dino().eval()
    g, lv = _views(n_local=2)
    lv.append(torch.randn(3, 3, 24, 24))
    out = model(global_views=g, local_views=lv)
    student = _crop_by_crop(model, g + lv, "student")
    teacher = _crop_by_crop(model, g, "teacher")
    torch.testing.assert_close(out.student_logits, student, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.teacher_logits, teacher, atol=1e-5, rtol=1e-4)
    want = reference_loss(student, teacher, model.dino_loss.center, 0.1, 0.04)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-4)


def test_teacher_sees_only_the_global_crops():
    model = _dino()
    calls = {"teacher": [], "student": []}
    for who in calls:
        backbone = getattr(model, f"{who}_backbone")
        backbone.register_forward_hook(lambda mod, args, out, who=who: calls[who].append(tuple(args[0].shape)))
    model(global_views=_views()[0], local_views=_views()[1])
    assert calls["teacher"] == [(6, 3, 32, 32)]  # 2 globals x B=3, one batched pass
    assert calls["student"] == [(6, 3, 32, 32), (6, 3, 16, 16)]  # the hook does see the locals


def test_loss_uses_the_old_centre_and_the_centre_is_updated_after():
    """Algorithm 1: ``loss = H(t - C, s)`` with the current C, *then* ``C = 0.9 C + 0.1 mean(t)``."""
    model = _dino()
    old = 0.2 * torch.randn(K, generator=torch.Generator().manual_seed(1))
    model.dino_loss.centering.center.copy_(old)
    g, lv = _views()
    out = model(global_views=g, local_views=lv)

    t = out.teacher_logits
    new = 0.9 * old + 0.1 * t.double().mean((0, 1))
    torch.testing.assert_close(model.dino_loss.center.double(), new, atol=1e-6, rtol=1e-5)
    with_old = reference_loss(out.student_logits.detach(), t, old, 0.1, 0.04).item()
    with_new = reference_loss(out.student_logits.detach(), t, new, 0.1, 0.04).item()
    assert out.loss.item() == pytest.approx(with_old, rel=1e-5)
    assert out.loss.item() != pytest.approx(with_new, rel=1e-3)  # the check can tell them apart


def test_centre_is_not_updated_in_eval_mode():
    model = _dino().eval()
    model(global_views=_views()[0])
    assert torch.equal(model.dino_loss.center, torch.zeros(K))


def test_update_teacher_follows_the_cosine_momentum():
    """With total_steps=10: m_k = 1 - (1 - 0.996) (1 + cos(pi k / 10)) / 2, returned by each call,
    and the teacher moves by (1 - m_k) of its gap to the student."""
    model = _dino(total_steps=10)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.1)
    ms = []
    for k in range(3):
        t_before = model.teacher_head.mlp[0].weight.clone()
        gap = model.student_head.mlp[0].weight.detach() - t_before
        ms.append(model.update_teacher())
        want = 1 - 0.004 * (1 + math.cos(math.pi * k / 10)) / 2
        assert ms[-1] == pytest.approx(want, abs=1e-12)
        torch.testing.assert_close(model.teacher_head.mlp[0].weight - t_before, (1 - want) * gap)
    assert ms[0] == pytest.approx(0.996) and ms[0] < ms[1] < ms[2]
    assert model.time.step == 3 and model.momentum(10) == 1.0
    assert model.update_teacher(0.5) == 0.5  # an explicit momentum overrides the schedule


def test_momentum_without_total_steps_stays_at_its_start_value():
    model = _dino()
    assert [model.update_teacher() for _ in range(3)] == [0.996] * 3


def test_set_epoch_changes_the_teacher_temperature():
    """DINO's np.linspace(0.04, 0.07, 30): 0.04 at epoch 0, 0.07 from epoch 29 on; the forward uses it."""
    model = _dino().eval()
    assert model.teacher_temperature == pytest.approx(0.04)
    model.set_epoch(15)
    assert model.teacher_temperature == pytest.approx(0.04 + 0.03 * 15 / 29)
    model.set_epoch(29)
    assert model.teacher_temperature == pytest.approx(0.07)
    model.set_epoch(30)
    assert model.teacher_temperature == pytest.approx(0.07)
    g, lv = _views()
    out = model(global_views=g, local_views=lv)
    assert out.teacher_temperature == pytest.approx(0.07)
    s, t = _crop_by_crop(model, g + lv), _crop_by_crop(model, g, "teacher")
    assert out.loss.item() == pytest.approx(reference_loss(s, t, model.dino_loss.center, 0.1, 0.07).item(), rel=1e-4)
    assert out.loss.item() != pytest.approx(reference_loss(s, t, model.dino_loss.center, 0.1, 0.04).item(), rel=1e-3)


def _trained_one_step():
    model = _dino(total_steps=20)
    opt = torch.optim.SGD(model.student_parameters(), lr=0.1)
    model(global_views=_views()[0], local_views=_views()[1]).loss.backward()
    opt.step()
    model.update_teacher()
    model.set_epoch(3)
    return model


def _eval_outputs(model):
    model.eval()
    g, lv = _views(seed=7)
    out = model(global_views=g, local_views=lv)
    return out.loss, out.student_logits, out.teacher_logits


def _assert_same_model(a, b):
    assert (b.time.step, b.time.epoch, b.time.total_steps) == (a.time.step, a.time.epoch,
                                                               a.time.total_steps) == (1, 3, 20)
    assert torch.equal(b.dino_loss.center, a.dino_loss.center)
    for x, y in zip(_eval_outputs(a), _eval_outputs(b)):
        assert torch.equal(x, y)


def test_state_dict_round_trip():
    model = _trained_one_step()
    other = _dino(seed=1)  # other weights: the outputs differ before loading
    assert not torch.equal(_eval_outputs(other)[0], _eval_outputs(model)[0])
    other.load_state_dict(model.state_dict())
    _assert_same_model(model, other)


def test_state_dict_round_trip_through_torch_save_weights_only():
    model = _trained_one_step()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = _dino(seed=1)
    other.load_state_dict(torch.load(buf, weights_only=True))
    _assert_same_model(model, other)


def _b(shape):
    return torch.randn(*shape)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(global_views=[_b((2, 3, 32, 32)), _b((3, 3, 32, 32))]), ValueError,
         r"global_views\[1\] has batch size 3 .*shape \(3, 3, 32, 32\).* global_views\[0\] has batch size 2"),
        (dict(global_views=[_b((2, 3, 32, 32))] * 2, local_views=[_b((4, 3, 16, 16))]), ValueError,
         r"local_views\[0\] has batch size 4 .*shape \(4, 3, 16, 16\)"),
        (dict(global_views=[]), ValueError, "global_views is empty"),
        (dict(global_views=None), ValueError, "global_views is required"),
        (dict(global_views=_b((2, 3, 32, 32))), TypeError,
         r"global_views must be a list .* single tensor of shape \(2, 3, 32, 32\); wrap it in a list"),
        (dict(global_views=[_b((2, 4, 32, 32))] * 2), ValueError,
         r"global_views\[0\] has 4 channels \(shape \(2, 4, 32, 32\)\) but the backbone expects 3"),
        (dict(global_views=[_b((2, 3, 32, 32))] * 2, local_views=[_b((2, 1, 16, 16))]), ValueError,
         r"local_views\[0\] has batch size 2 and 1 channels"),
        (dict(global_views=[_b((3, 32, 32))] * 2), ValueError,
         r"global_views\[0\] must be \[B, C, H, W\], got shape \(3, 32, 32\)"),
        (dict(global_views=["a", "b"]), TypeError, r"global_views\[0\] must be a torch.Tensor, got str"),
        (dict(global_views=[_b((2, 3, 32, 32))]), ValueError, "at least two views"),
        (dict(images=_b((2, 4, 32, 32))), ValueError, r"images has 4 channels \(shape \(2, 4, 32, 32\)\)"),
    ],
    ids=["batch-globals", "batch-locals", "empty", "none", "single-tensor", "channels", "channels-locals",
         "3d-view", "not-tensor", "one-view", "images-channels"],
)
def test_bad_inputs_name_the_argument_and_shapes(kwargs, error, message):
    with pytest.raises(error, match=message):
        _dino()(**kwargs)


def test_backbone_without_a_usable_embedding_is_refused():
    class ReturnsDict(nn.Module):
        def forward(self, x):
            return {"cls": x.mean((2, 3))}

    with pytest.raises(TypeError, match="returned dict; it must return a tensor"):
        DINO(ReturnsDict(), **HEAD)


def test_non_finite_logits_are_reported():
    nan = [torch.full((2, 3, 32, 32), float("nan"))] * 2
    with pytest.raises(ValueError, match=r"student_logits has non-finite values \(shape \(2, 2, 64\)\)"):
        _dino()(global_views=nan)
    # control: without the check the NaN goes through silently
    assert torch.isnan(_dino(check_finite=False)(global_views=nan).loss)


def test_zero_local_crops():
    """Two globals only: the two cross pairs (t0, s1) and (t1, s0)."""
    model = _dino().eval()
    g, _ = _views()
    out = model(global_views=g, local_views=[])
    assert out.student_logits.shape == (2, 3, K)
    s, t = _crop_by_crop(model, g), _crop_by_crop(model, g, "teacher")
    assert out.loss.item() == pytest.approx(reference_loss(s, t, model.dino_loss.center, 0.1, 0.04).item(), rel=1e-4)


def test_cnn_backbone_with_batch_norm_in_the_head():
    model = _dino(backbone=tiny_cnn(), heads={"batch_norm": True})
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.student_head.mlp) == 2
    g, lv = _views()
    out = model(global_views=g, local_views=lv)
    assert out.student_logits.shape == (4, 3, K) and out.embedding.shape == (6, 8)
    out.loss.backward()
    assert all(p.grad is not None for p in model.student_parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
