"""Methods are compositions of loss terms: a new term is one class plus a registration, the
presets are those compositions, the registry drives the builder, and the seeds' surfaces hold."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from conftest import settings, tiny_vit
from dinokit import DINO, DINOv2, DINOv3
from dinokit.config import ConfigError, load_config
from dinokit.methods.composed import ComposedMethod
from dinokit.methods.registry import METHODS
from dinokit.methods.terms import (
    GLOBAL_CLS,
    TERMS,
    DINOClsTerm,
    LossTerm,
    StepFeatures,
    TermOutput,
    register_term,
)

HEAD = dict(hidden_dim=32, bottleneck_dim=16, layers=2)


def _views(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)],
            [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)])


class CLSVarianceTerm(LossTerm):
    """A toy term: pushes each CLS feature dimension's std towards 1 (VICReg-like variance)."""

    name = "cls_variance"
    consumes = frozenset({GLOBAL_CLS})

    def forward(self, f: StepFeatures, student: nn.ModuleDict, teacher: nn.ModuleDict) -> TermOutput:
        std = f.student_global.cls.std(dim=0)
        return TermOutput(torch.relu(1.0 - std).mean())


def test_a_new_term_is_one_class_and_one_registration():
    register_term(CLSVarianceTerm)
    assert TERMS["cls_variance"] is CLSVarianceTerm
    s = settings(heads=dict(HEAD, norm_last_layer=True, weight_norm=True), dino=dict(n_prototypes=24),
                 teacher=dict(centering="ema", momentum=0.99, warmup_unit="epoch", warmup_epochs=0,
                              temperature=0.04))
    cls = DINOClsTerm(s.dino, s.heads, s.teacher)
    m = ComposedMethod(tiny_vit(), [cls, CLSVarianceTerm(weight=0.5)], teacher=s.teacher)
    g, lv = _views()
    out = m(global_views=g, local_views=lv)
    assert set(out.losses) == {"loss_cls", "loss_cls_variance"}
    torch.testing.assert_close(out.loss.detach(), out.losses["loss_cls"] + 0.5 * out.losses["loss_cls_variance"])
    out.loss.backward()
    assert all(p.grad is not None for p in m.student_backbone.parameters() if p.requires_grad
               and p is not m.student_backbone.model.pos_embed)


def test_registering_a_term_with_unknown_features_or_a_taken_name_fails():
    class Bad(LossTerm):
        name = "bad"
        consumes = frozenset({"pixels"})

    with pytest.raises(ValueError, match="unknown features"):
        register_term(Bad)

    class Clash(LossTerm):
        name = "cls"

    with pytest.raises(ValueError, match="already registered"):
        register_term(Clash)


def test_presets_are_compositions_of_the_official_terms():
    assert [t.name for t in DINO(tiny_vit(), n_prototypes=24, projector_hidden_dim=32,
                                 projector_bottleneck_dim=16).terms] == ["cls"]
    v2 = DINOv2(tiny_vit(), n_prototypes=24, n_patch_prototypes=12, projector_hidden_dim=32,
                projector_bottleneck_dim=16)
    assert [t.name for t in v2.terms] == ["cls", "patch", "koleo"] and v2.needs_masks
    assert v2.teacher_settings.momentum == 0.992  # official DINOv2 default
    assert v2.student["head"].last_layer.weight_g.requires_grad  # DINOv2 trains the WN gain
    v3 = DINOv3(tiny_vit(num_registers=4), n_cls_prototypes=24, n_patch_prototypes=12,
                projector_hidden_dim=32, projector_bottleneck_dim=16,
                settings=settings(gram=dict(weight=1.0, start_step=3)))
    assert [t.name for t in v3.terms] == ["cls", "patch", "koleo", "gram"]
    assert not hasattr(v3.student["head"].last_layer, "weight_g")  # DINOv3: no weight norm


def test_gram_teacher_is_taken_from_the_ema_teacher_when_the_gram_stage_starts():
    v3 = DINOv3(tiny_vit(num_registers=4), n_cls_prototypes=24, n_patch_prototypes=12,
                projector_hidden_dim=32, projector_bottleneck_dim=16,
                settings=settings(gram=dict(weight=1.0, start_step=2), teacher=dict(warmup_epochs=0)))
    g, lv = _views()
    opt = torch.optim.SGD(v3.student_parameters(), lr=0.5)
    for _ in range(2):  # steps 0 and 1: no Gram loss, no Gram teacher yet
        out = v3(global_views=g, local_views=lv)
        assert "loss_gram" not in out.losses
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        v3.update_teacher(0.5)
    assert not bool(v3.gram_term.initialized)
    out = v3(global_views=g, local_views=lv)  # step 2: loaded from the (moved) EMA teacher now
    assert "loss_gram" in out.losses
    for a, b in zip(v3.gram_teacher.parameters(), v3.teacher_backbone.parameters()):
        torch.testing.assert_close(a, b)


def test_the_gram_teacher_stays_frozen_in_eval_mode_when_the_method_trains():
    v3 = DINOv3(tiny_vit(num_registers=4, drop_path_rate=0.5), n_cls_prototypes=24, n_patch_prototypes=12,
                projector_hidden_dim=32, projector_bottleneck_dim=16, settings=settings(gram=dict(weight=1.0)))
    v3.train()  # Lightning and users put the whole method in train mode
    assert v3.student_backbone.training
    assert not any(m.training for m in v3.gram_teacher.modules())  # no stochastic depth in the anchor
    assert not any(p.requires_grad for p in v3.gram_teacher.parameters())


def test_registry_drives_config_validation_and_the_builder():
    assert {"dino", "ibot", "dinov2", "dinov3"} <= set(METHODS)
    with pytest.raises(ConfigError, match="model.method"):
        load_config("demo", ["model.method=dinov4"])
    from dinokit.train.build import build_method

    assert build_method(load_config("dinov2_tiny_cpu")).rules == {
        "clip_mode": "per_module", "no_decay_rule": "dinov2", "freeze_last_layer_mode": "zero_lr",
        "layer_decay": 0.9, "patch_embed_lr_mult": 0.2, "lr": 0.004, "lr_scaling": "sqrt",
        "lr_reference_batch": 1024}
    assert build_method(load_config("demo")).rules["clip_mode"] == "per_param"
    assert type(build_method(load_config("demo", ["model.method=ibot"]))).__name__ == "IBOT"


def test_seed_004_dinov3_call_and_attributes():
    m = DINOv3(tiny_vit(num_registers=4), n_register_tokens=4, koleo_weight=0.1, projector_hidden_dim=32,
               projector_bottleneck_dim=16, n_cls_prototypes=24, n_patch_prototypes=12, mask_ratio=0.3,
               patch_loss_weight=1.0, temperature_student=0.1, temperature_teacher=0.07,
               ema_decay_start=0.996, ema_decay_end=1.0, image_size=32, pretrained=False)
    assert m.n_register_tokens == 4 and m.cls_head is m.student["head"]
    assert m.patch_head is m.student["patch_head"]
    with pytest.warns(UserWarning, match="set_run_length"):  # official: warmed up per step
        assert m.teacher_temperature == pytest.approx(0.04)
    constant = DINOv3(tiny_vit(num_registers=4), projector_hidden_dim=32, projector_bottleneck_dim=16,
                      n_cls_prototypes=24, n_patch_prototypes=12, temperature_teacher=0.07,
                      settings=settings(teacher=dict(warmup_epochs=0)))
    assert constant.teacher_temperature == pytest.approx(0.07)  # the seed's constant temperature, asked for
    m = constant
    g, lv = _views()
    out = m(global_views=g, local_views=lv)
    assert {"loss", "loss_cls", "loss_patch", "loss_koleo", "embedding"} <= set(out)


def test_seed_001_output_behaves_as_a_model_output():
    m = DINO(tiny_vit(), n_prototypes=24, projector_hidden_dim=32, projector_bottleneck_dim=16)
    out = m(global_views=_views()[0], local_views=_views()[1])
    assert out[0] is out.loss and out.to_tuple()[0] is out.loss and out["loss"] is out.loss
    assert len(out.to_tuple()) == len(out)


def test_seed_002_trainer_import_path():
    from dinokit.train import DINOTrainer

    assert callable(DINOTrainer.train_epoch) and callable(DINOTrainer.validate)


def test_a_composed_method_pickles_with_its_terms():
    m = DINOv2(tiny_vit(), n_prototypes=24, n_patch_prototypes=12, projector_hidden_dim=32,
               projector_bottleneck_dim=16)
    again = pickle.loads(pickle.dumps(m))
    assert [t.name for t in again.terms] == ["cls", "patch", "koleo"]
