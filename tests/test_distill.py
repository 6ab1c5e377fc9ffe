"""Distillation (``model.method=distill``): a frozen teacher, the DINOv3-style objective against a
reference written from the official multi-distillation code, the feature objective against one
written here, the grid resampling against hand values, several students against each trained
alone, and a CNN student through the CLI (train, SIGTERM and resume, timm export)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from torch import nn

from dinokit.backbones import build_backbone
from dinokit.cli import main
from dinokit.heads import DINOHead
from dinokit.losses.gram import resample_patch_grid
from dinokit.methods import Distillation
from dinokit.settings import (
    BackboneSettings,
    DistillationSettings,
    MethodSettings,
    ModelSettings,
    OptimSettings,
)
from dinokit.train.step import StepSettings, TrainingStep, build_method_optimizer
from test_faults import SIGTERM_SCRIPT, _assert_same_weights, _subprocess
from test_parity_official import OfficialKoLeo, official_forward_masked, official_sinkhorn

B, K, SIZE, LOCAL = 4, 16, 16, 8
VIT = dict(img_size=SIZE, patch_size=4, depth=1, embed_dim=24, num_heads=2, in_chans=1)


def tiny_teacher(heads: bool = True) -> nn.ModuleDict:
    torch.manual_seed(123)
    bb = build_backbone("vit_tiny_patch16_224", encoder_kwargs=VIT)
    nets = {"backbone": bb}
    if heads:
        nets["head"] = DINOHead(24, K, hidden_dim=16, bottleneck_dim=8, weight_norm=False)
        nets["patch_head"] = DINOHead(24, K, hidden_dim=16, bottleneck_dim=8, weight_norm=False)
    return nn.ModuleDict(nets)


def settings(student: dict | None = None, students: list | None = None, **distillation) -> MethodSettings:
    s = MethodSettings()
    return dataclasses.replace(
        s, backbone=BackboneSettings(**(student or {"name": "vit_tiny_patch16_224",
                                                    "kwargs": {**VIT, "embed_dim": 16}})),
        heads=dataclasses.replace(s.heads, hidden_dim=16, bottleneck_dim=8),
        teacher=dataclasses.replace(s.teacher, warmup_epochs=0),
        distillation=dataclasses.replace(s.distillation, **distillation),
        model=ModelSettings(method="distill", students=list(students or [])))


def views(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    glob = [torch.randn(B, 1, SIZE, SIZE, generator=g) for _ in range(2)]
    loc = [torch.randn(B, 1, LOCAL, LOCAL, generator=g) for _ in range(2)]
    return glob, loc


def masks(seed: int = 0):
    """Half of the global crops masked (as DINOv2's collate), flat indices and weights."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(2 * B, 16, generator=g) < 0.4
    m[B:] = False
    idx = m.flatten().nonzero().flatten()
    w = (1 / m.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(m)[m]
    return m, idx, w


# ----------------------------------------------------------------------------- the frozen teacher
def test_the_teacher_gets_no_gradient_and_is_bit_identical_after_training():
    teacher = tiny_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    method = Distillation(teacher, settings=settings())
    assert method.objective == "dinov3"
    opt = build_method_optimizer(method, OptimSettings(lr=0.05, warmup_epochs=0))
    step = TrainingStep(method, opt, StepSettings(optim=OptimSettings(lr=0.05, warmup_epochs=0)))
    step.plan(3, 3, B)
    method.train()
    assert not method.teacher.training and all(not m.training for m in method.teacher.modules())
    student_before = method.student_backbone.model.blocks[0].attn.qkv.weight.clone()
    for i in range(3):
        g, lv = views(i)
        m, idx, w = masks(i)
        step({"global_views": g, "local_views": lv, "masks": m, "mask_indices": idx, "mask_weights": w},
             step=i, epoch=0)
        assert all(p.grad is None for p in method.teacher.parameters())
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert not any(p is q for p in method.teacher.parameters() for g in opt.param_groups for q in g["params"])
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(method.student_backbone.model.blocks[0].attn.qkv.weight, student_before)


def test_checkpoints_leave_the_teacher_out_and_a_resume_refuses_another_teacher():
    """A training checkpoint holds the students, not the frozen teacher (an input of the run, as
    large as it is): it records the teacher's fingerprint. A resumed run rebuilds the teacher from
    model.teacher and loads strictly only when the fingerprint is the same; one changed weight
    is refused. ``distillation.checkpoint_teacher=true`` writes the teacher in."""
    import copy

    from dinokit.train.module import DINOModule
    from dinokit.weights import WeightsError

    module = DINOModule(Distillation(tiny_teacher(), settings=settings()))
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any(k.startswith("method.teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("method.students.student.") for k in ckpt["state_dict"])
    assert set(ckpt["dinokit"]["external"]) == {"teacher"}

    again = DINOModule(Distillation(tiny_teacher(), settings=settings()))  # the same teacher, rebuilt
    loaded = copy.deepcopy(ckpt)
    again.on_load_checkpoint(loaded)
    again.load_state_dict(loaded["state_dict"], strict=True)
    for k, v in module.state_dict().items():
        assert torch.equal(again.state_dict()[k], v) if isinstance(v, torch.Tensor) else True, k

    other = tiny_teacher()
    with torch.no_grad():
        other["head"].mlp[0].weight[0, 0] += 1e-6  # one weight of one head
    with pytest.raises(WeightsError, match="model.teacher: not the teacher this run was trained with"):
        DINOModule(Distillation(other, settings=settings())).on_load_checkpoint(copy.deepcopy(ckpt))

    whole = DINOModule(Distillation(tiny_teacher(), settings=settings(checkpoint_teacher=True)))
    ckpt = {"state_dict": whole.state_dict()}
    whole.on_save_checkpoint(ckpt)
    assert "external" not in ckpt["dinokit"]
    assert {k for k in whole.state_dict() if k.startswith("method.teacher.")} <= set(ckpt["state_dict"])


# ----------------------------------------------------------------------------- the DINOv3 objective
def official_multidist_loss(teacher, student, g, lv, m, idx, w, temp, koleo_weight=0.1, ibot_weight=1.0):
    """dinov3/train/multidist_meta_arch.py ``forward_backward`` + ``get_teacher_output`` with
    ssl_meta_arch.py ``get_student_output`` (student crops unmasked under distillation) and
    ``compute_losses`` (dino_global_ignore_diagonal, no local reweighting, no Gram), one process."""
    n_g, n_l = len(g), len(lv)
    with torch.no_grad():
        t = teacher["backbone"](torch.cat(g))
        tokens = t.patches.flatten(0, 1)
        masked_patch_after_head = teacher["patch_head"](tokens).index_select(0, idx)  # row-wise head
        cls_after_head = teacher["head"](t.cls)
        cls_centered = official_sinkhorn(cls_after_head, temp, cls_after_head.shape[0]).unflatten(0, (n_g, B))
        masked_patch_centered = official_sinkhorn(masked_patch_after_head, temp, idx.shape[0])
    s_g = student["backbone"](torch.cat(g))
    s_l = student["backbone"](torch.cat(lv))
    masked_pre_head = s_g.patches.flatten(0, 1).index_select(0, idx)
    s_masked = student["patch_head"](masked_pre_head)
    s_cls = student["head"](torch.cat([s_g.cls, s_l.cls]))
    s_global, s_local = s_cls[: n_g * B].unflatten(0, (n_g, B)), s_cls[n_g * B:].unflatten(0, (n_l, B))

    def dino_loss(student_logits, teacher_probs, ignore_diagonal=False):
        s_crops, t_crops = student_logits.shape[0], teacher_probs.shape[0]
        lsm = F.log_softmax(student_logits.float() / 0.1, dim=-1)
        if not ignore_diagonal:
            return -torch.einsum("s b k, t b k -> ", lsm, teacher_probs) / (B * s_crops * t_crops)
        loss = -torch.einsum("s b k, t b k -> s t", lsm, teacher_probs)
        min_st = min(s_crops, t_crops)
        loss = torch.diagonal_scatter(loss, loss.new_zeros(min_st))
        return loss.sum() / (B * s_crops * t_crops - B * min_st)

    global_terms, local_terms = n_g * (n_g - 1), n_g * n_l
    global_scale = global_terms / (global_terms + local_terms)
    local_scale = local_terms / (global_terms + local_terms)
    dino = local_scale * dino_loss(s_local, cls_centered) + global_scale * dino_loss(
        s_global, cls_centered, ignore_diagonal=True)
    koleo = sum(OfficialKoLeo()(x) for x in s_g.cls.unflatten(0, (n_g, B))) / n_g
    ibot = official_forward_masked(s_masked, masked_patch_centered, m, 0.1, idx.shape[0], w)
    return dino + koleo_weight * n_g * koleo + ibot_weight * ibot, (dino, ibot)


def test_dinov3_objective_equals_the_official_multi_distillation_and_its_gradient():
    teacher = tiny_teacher()
    torch.manual_seed(0)
    method = Distillation(teacher, settings=settings())
    g, lv = views()
    m, idx, w = masks()
    method.time.step = 0
    temp = method.teacher_temperature
    out = method(global_views=g, local_views=lv, masks=m, mask_indices=idx, mask_weights=w)
    ref, (dino, ibot) = official_multidist_loss(method.teacher, method.student, g, lv, m, idx, w, temp)
    torch.testing.assert_close(out.losses["loss_cls"], dino.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_patch"], ibot.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    params = method.student_parameters()
    got = torch.autograd.grad(out.loss, params)
    want = torch.autograd.grad(ref, params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_student_heads_take_the_teachers_prototype_counts():
    method = Distillation(tiny_teacher(), settings=settings())
    assert method.student["head"].out_dim == K and method.student["patch_head"].out_dim == K
    assert method.needs_masks and method.mask_patch_size == 4


# ----------------------------------------------------------------------------- the feature objective
class MapNet(nn.Module):
    """A small CNN whose feature map is 2x2 on a 16-pixel input (a student grid unlike the teacher's 4x4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 12, kernel_size=8, stride=8)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("loss", ["cosine", "smooth_l1", "cosine+smooth_l1"])
def test_feature_objective_of_a_cnn_student_equals_a_reference(loss):
    teacher = tiny_teacher(heads=False)
    torch.manual_seed(0)
    method = Distillation(teacher, MapNet(), settings=settings(loss=loss, cls_weight=1.0, patch_weight=2.0,
                                                                smooth_l1_beta=0.5))
    assert method.objective == "features" and not method.needs_masks
    g, lv = views()
    out = method(global_views=g, local_views=lv)
    with torch.no_grad():
        t = teacher["backbone"](torch.cat(g))
    fmap = method.student_backbone.model(torch.cat(g))  # [2B, 12, 2, 2]
    s_cls = method.student["cls_projector"](fmap.mean(dim=(2, 3)))
    up = F.interpolate(fmap, size=(4, 4), mode="bilinear", align_corners=False)  # to the teacher's grid
    s_patch = method.student["patch_projector"](up.flatten(2).transpose(1, 2))

    def dist(s, t):
        total = 0.0
        if "cosine" in loss:
            total = total + (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        if "smooth_l1" in loss:
            tn = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
            d = (s - tn).abs()
            total = total + torch.where(d < 0.5, 0.5 * d**2 / 0.5, d - 0.25).sum(-1).mean()
        return total

    ref = (1.0 * dist(s_cls, t.cls) + 2.0 * dist(s_patch, t.patches)) / 3.0
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert "cls_projector" in method.student and "patch_projector" in method.student


def test_cls_only_feature_distillation_needs_no_feature_map():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 10)

        def forward(self, x):  # [B, 10]: pooled features, no map
            return self.fc(F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1))

    method = Distillation(tiny_teacher(heads=False), Pooled(), settings=settings(patch_weight=0.0))
    assert list(method.student) == ["backbone", "cls_projector"]
    out = method(global_views=views()[0])
    assert torch.isfinite(out.loss)
    with pytest.raises(TypeError, match="patch_weight=0"):
        Distillation(tiny_teacher(heads=False), Pooled(), settings=settings())


def test_feature_distillation_learns_from_one_view_per_image(tmp_path):
    """The feature objective matches the student's features of a view to the teacher's of the same
    view, so one global crop per image is a whole step (lightly-train's setting); the DINOv3-style
    objective compares different crops and keeps the two-crop rule. Local crops, which the feature
    objective never reads, are named when asked for."""
    from dinokit.config import ConfigError, load_config
    from dinokit.export import export_timm_folder
    from dinokit.train.build import build_method

    method = Distillation(tiny_teacher(heads=False), MapNet(), settings=settings())
    out = method(global_views=views()[0][:1])
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert all(p.grad is not None for p in method.student_parameters())

    export_timm_folder(tiny_teacher(heads=False)["backbone"], tmp_path / "teacher")
    one_view = ["model.teacher=" + str(tmp_path / "teacher"), "crops.n_global=1", "crops.n_local=0",
                "distillation.objective=features", *STUDENT_RUN[:-1]]
    assert load_config("distill_tiny_cpu", one_view).crops.n_global == 1
    with pytest.raises(ConfigError, match="at least two crops"):
        load_config("distill_tiny_cpu", [*one_view, "distillation.objective=auto"])
    with pytest.warns(UserWarning, match="crops.n_local=2: feature distillation reads the global crops only"):
        build_method(load_config("distill_tiny_cpu", [*one_view, "crops.n_local=2"]))
    assert main(["train", "--config", "distill_tiny_cpu", *one_view, "trainer.max_steps=2",
                 f"trainer.output_dir={tmp_path}", "trainer.run_name=one"]) == 0
    assert torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


# ----------------------------------------------------------------------------- grid resampling
def test_grid_resampling_equals_hand_computed_values():
    # 2x2 -> 4x4, bilinear, align_corners=False: each axis samples the source at -0.25, 0.25, 0.75,
    # 1.25 (clamped to [0, 1]), so a row [a, b] becomes [a, .75a + .25b, .25a + .75b, b].
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    up = resample_patch_grid(x.reshape(1, 4, 1), (2, 2), (4, 4), mode="bilinear")
    row = lambda a, b: [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]  # noqa: E731
    cols = [row(a, b) for a, b in ((0.0, 2.0), (1.0, 3.0))]  # each column, top to bottom
    want = torch.tensor([row(cols[0][i], cols[1][i]) for i in range(4)])
    torch.testing.assert_close(up.reshape(4, 4), want)
    # 4x4 -> 2x2: samples at 0.5 and 2.5, halfway between two cells: the mean of each 2x2 block
    y = torch.arange(16.0).reshape(4, 4)
    down = resample_patch_grid(y.reshape(1, 16, 1), (4, 4), (2, 2), mode="bilinear").reshape(2, 2)
    torch.testing.assert_close(down, torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    # one cell (a CNN whose map is 1x1 on small images): every teacher patch gets its value
    one = resample_patch_grid(torch.full((1, 1, 3), 7.0), (1, 1), (7, 7), mode="bilinear")
    torch.testing.assert_close(one, torch.full((1, 49, 3), 7.0))


# ----------------------------------------------------------------------------- several students
STUDENTS = [
    {"name": "vit", "backbone": {"name": "vit_tiny_patch16_224", "kwargs": {**VIT, "embed_dim": 16}},
     "lr_mult": 1.0},
    {"name": "cnn", "backbone": {"name": "resnet10t", "kwargs": {"in_chans": 1}}, "lr_mult": 2.0},
]


def _train(students: list, steps: int = 3) -> Distillation:
    torch.manual_seed(0)
    method = Distillation(tiny_teacher(), settings=settings(students=students))
    optim = OptimSettings(lr=0.05, warmup_epochs=0, clip_grad=0.5)
    opt = build_method_optimizer(method, optim)
    step = TrainingStep(method, opt, StepSettings(optim=optim))
    step.plan(steps, steps, B)
    method.train()
    for i in range(steps):
        g, lv = views(i)
        m, idx, w = masks(i)
        step({"global_views": g, "local_views": lv, "masks": m, "mask_indices": idx, "mask_weights": w},
             step=i, epoch=0)
    return method


def test_two_students_trained_together_equal_each_trained_alone():
    together = _train(STUDENTS)
    assert list(together.students) == ["vit", "cnn"]
    for entry in STUDENTS:
        alone = _train([entry])
        a, b = together.students[entry["name"]].state_dict(), alone.students[entry["name"]].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{entry['name']}.{k}")


def test_each_student_has_its_own_parameter_groups_and_lr_multiplier():
    method = Distillation(tiny_teacher(), settings=settings(students=STUDENTS))
    opt = build_method_optimizer(method, OptimSettings())
    ids = {name: {id(p) for p in net.parameters()} for name, net in method.students.items()}
    for g in opt.param_groups:
        owners = {name for name, s in ids.items() if any(id(p) in s for p in g["params"])}
        assert len(owners) == 1
        if owners == {"cnn"}:
            assert g["lr_scale"] == 2.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(method.student_parameters())


# ----------------------------------------------------------------------------- CLI: CNN student
TEACHER_RUN = [
    "data.dataset=digits", "data.limit=64", "data.batch_size=16", "data.num_workers=0", "trainer.progress=false",
    "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, in_chans: 1}",
    "dino.n_prototypes=32", "ibot.n_prototypes=32", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
    "trainer.max_steps=2", "trainer.log_every_n_steps=1",
]
STUDENT_RUN = [
    "data.dataset=digits", "data.limit=64", "data.batch_size=16", "data.num_workers=0", "trainer.epochs=2",
    "trainer.progress=false", "trainer.log_every_n_steps=1", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
    "crops.n_local=2",
]


def test_a_cnn_student_of_a_vit_teacher_trains_resumes_after_sigterm_and_exports_to_timm(tmp_path, capsys):
    assert main(["train", "--config", "dinov3_tiny_cpu", *TEACHER_RUN, f"trainer.output_dir={tmp_path}",
                 "trainer.run_name=teacher"]) == 0
    args = ["train", "--config", "distill_tiny_cpu", *STUDENT_RUN, f"model.teacher={tmp_path / 'teacher'}",
            f"trainer.output_dir={tmp_path}"]
    done = _subprocess(SIGTERM_SCRIPT, *args, "trainer.run_name=pre")
    assert done.returncode == 75, done.stderr[-2000:]
    last = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert main([*args, "trainer.run_name=pre", "trainer.resume=auto"]) == 0
    assert main([*args, "trainer.run_name=ref"]) == 0
    _assert_same_weights(last, tmp_path / "ref" / "checkpoints" / "last.ckpt")
    saved = torch.load(last, weights_only=True)
    assert not any(k.startswith("method.teacher.") for k in saved["state_dict"])  # the teacher: a fingerprint
    assert set(saved["dinokit"]["external"]) == {"teacher"}

    # resuming against a teacher file whose weights changed is refused on one line
    teacher_ckpt = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    changed = torch.load(teacher_ckpt, weights_only=True)
    key = next(k for k in changed["state_dict"] if k.startswith("method.teacher.head."))
    changed["state_dict"][key] = changed["state_dict"][key] + 1e-3
    torch.save(changed, tmp_path / "changed.ckpt")
    before = last.read_bytes()
    assert main([*args[:-1], f"model.teacher={tmp_path / 'changed.ckpt'}", f"trainer.output_dir={tmp_path}",
                 "trainer.run_name=pre", "trainer.resume=last", "trainer.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "model.teacher: not the teacher this run was trained with" in err and "Traceback" not in err
    assert last.read_bytes() == before

    out = tmp_path / "student"
    assert main(["export", "--checkpoint", str(tmp_path / "pre"), "--output", str(out)]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    assert type(model).__name__ == "ResNet"
    exported = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert set(exported) == set(model.state_dict())  # the student only: no teacher tensor
    state = torch.load(last, weights_only=True)["state_dict"]
    prefix = "method.students.student.backbone.model."
    for k, v in exported.items():
        assert torch.equal(v, state[prefix + k]), k
    from dinokit.cli._common import load
    from dinokit.embed import load_for_embedding

    assert type(load(str(tmp_path / "pre")).backbone.model).__name__ == "ResNet"  # eval and viz: the student
    backbone, _ = load_for_embedding(tmp_path / "pre")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), backbone(x).cls, rtol=1e-5, atol=1e-5)

    # a new run started from the distillation's checkpoint starts from its student (heads fresh)
    from dinokit.config import load_config
    from dinokit.train.build import build_method

    dino = build_method(load_config("demo_cnn", [f"model.init_weights={last}"]))
    for k, v in dino.student_backbone.state_dict().items():
        assert torch.equal(v, state["method.students.student.backbone." + k]), k
    assert torch.equal(dino.teacher_backbone.model.conv1[0].weight, dino.student_backbone.model.conv1[0].weight)


def test_a_distillation_without_a_teacher_fails_in_one_line(tmp_path, capsys):
    code = main(["train", "--config", "distill_tiny_cpu", *STUDENT_RUN, f"trainer.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.teacher" in err and "Traceback" not in err


def test_distillation_settings_are_checked():
    with pytest.raises(ValueError, match="objective"):
        Distillation(tiny_teacher(), settings=settings(objective="nope"))
    with pytest.raises(ValueError, match="needs a teacher with its DINO head"):
        Distillation(tiny_teacher(heads=False), settings=settings(objective="dinov3"))
    assert math.isclose(DistillationSettings().weight, 1.0)


# ----------------------------------------------------------------------------- the estimator
def test_the_estimator_distils_a_teacher_into_its_encoder_and_transforms_with_the_student():
    from test_estimator import TinyCNN, _est, _images

    x, _ = _images(n=32)
    teacher = tiny_teacher(heads=False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cls_only = dataclasses.replace(MethodSettings(), distillation=DistillationSettings(patch_weight=0.0))
    est = _est(distill_teacher=teacher, settings=cls_only, max_epochs=3, learning_rate=3e-2).fit(x)
    assert isinstance(est.method_, Distillation) and est.method_.objective == "features"
    assert est.encoder_ is est.student and est.encoder_ is not est.teacher
    assert isinstance(est.encoder_.model, TinyCNN)
    assert est.history_[-1] < est.history_[0]
    f = est.transform(x)
    assert f.shape == (32, 8)
    for k, v in est.method_.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sync_batchnorm_reaches_every_student():
    from dinokit.train.strategy import convert_sync_batchnorm

    students = [*STUDENTS, {"name": "cnn2", "backbone": {"name": "resnet10t", "kwargs": {"in_chans": 1}}}]
    method = Distillation(tiny_teacher(), settings=settings(students=students))
    assert convert_sync_batchnorm(method) > 0
    for name in ("cnn", "cnn2"):
        bns = [m for m in method.students[name].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns), name


def test_teacher_files_load_the_same_weights_and_name_what_they_lack(tmp_path):
    from dinokit.export import export_backbone, export_timm_folder
    from dinokit.weights import WeightsError

    bb = tiny_teacher(heads=False)["backbone"]
    export_timm_folder(bb, tmp_path / "folder")
    single = export_backbone(bb, tmp_path / "single")
    raw = tmp_path / "raw.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(raw))
    want = {k: v for k, v in bb.model.state_dict().items()}
    for source, extra in ((tmp_path / "folder", {}), (single, {}),
                          (raw, {"teacher_backbone": "vit_tiny_patch16_224", "teacher_kwargs": VIT})):
        method = Distillation(source, MapNet(), settings=settings(**extra))
        assert method.objective == "features"
        got = method.teacher["backbone"].model.state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v), (source, k)
    with pytest.raises(WeightsError, match="distillation.teacher_backbone"):
        Distillation(raw, MapNet(), settings=settings())
    with pytest.raises(WeightsError, match="does not exist"):
        Distillation(tmp_path / "missing.pth", MapNet(), settings=settings())


class OfficialHead(nn.Module):
    """The official DINO head as ``dinov3/layers/dino_head.py`` builds it (``_build_mlp``: Linear,
    [BatchNorm1d], GELU per hidden layer, a bare Linear when ``nlayers=1``; L2 normalisation; bias-free
    prototypes), with DINOv2's ``nn.utils.weight_norm`` prototypes when ``weight_norm``."""

    def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=16, bottleneck_dim=8, use_bn=False,
                 weight_norm=False):
        super().__init__()
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else [])
                layers += [nn.GELU()]
            self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        if weight_norm:
            with pytest.warns(FutureWarning):  # DINOv2's (deprecated) torch.nn.utils.weight_norm
                self.last_layer = nn.utils.weight_norm(self.last_layer)
            self.last_layer.weight_g.data.uniform_(0.5, 2.0)  # a trained gain, not the initial 1

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12))


@pytest.mark.parametrize("layout", ["dinov3_eval", "dinov2_train_bn_1layer_ibot"])
def test_an_official_training_file_brings_the_teachers_heads(tmp_path, layout):
    """DINOv2/DINOv3 training writes the EMA teacher with its heads (``teacher_checkpoint.pth``:
    ``{"teacher": {backbone., dino_head., ibot_head.}}``; training checkpoints ``{"model":
    {"teacher.…"}}``): read as a teacher, the heads give the official heads' logits and the
    DINOv3-style objective runs with their prototype counts."""
    torch.manual_seed(0)
    bb = tiny_teacher(heads=False)["backbone"]
    if layout == "dinov3_eval":
        dino, ibot = OfficialHead(24, 12), OfficialHead(24, 20)
    else:
        dino = OfficialHead(24, 12, nlayers=1, use_bn=True, weight_norm=True)
        ibot = OfficialHead(24, 20, nlayers=2, use_bn=True, weight_norm=True)
        for m in (dino, ibot):  # trained batch-norm statistics
            for b in m.modules():
                if isinstance(b, nn.BatchNorm1d):
                    b.running_mean.uniform_(-1, 1), b.running_var.uniform_(0.5, 2)
    teacher = {**{f"backbone.{k}": v for k, v in bb.model.state_dict().items()},
               **{f"dino_head.{k}": v for k, v in dino.state_dict().items()},
               **{f"ibot_head.{k}": v for k, v in ibot.state_dict().items()}}
    obj = {"teacher": teacher} if layout == "dinov3_eval" else {"model": {f"teacher.{k}": v for k, v in teacher.items()}}
    torch.save(obj, tmp_path / "teacher_checkpoint.pth")
    method = Distillation(tmp_path / "teacher_checkpoint.pth",
                          settings=settings(teacher_backbone="vit_tiny_patch16_224", teacher_kwargs=VIT))
    assert method.objective == "dinov3"
    x = torch.randn(5, 24)
    dino.eval(), ibot.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.teacher["head"](x), dino(x))
        torch.testing.assert_close(method.teacher["patch_head"](x), ibot(x))
    student = method.students["student"]
    assert student["head"].out_dim == 12 and student["patch_head"].out_dim == 20
    g, lv = views()
    m, idx, w = masks()
    assert torch.isfinite(method(global_views=g, local_views=lv, masks=m, mask_indices=idx, mask_weights=w).loss)


def test_every_command_reads_the_student_it_is_named(tmp_path, capsys):
    """A run with two students: ``--student NAME`` picks that student in eval, embed and export
    alike (the first one without it); an unknown name, or a name given for a run that is not a
    distillation, is one line and exit 2."""
    import numpy as np

    assert main(["train", "--config", "dinov3_tiny_cpu", *TEACHER_RUN, f"trainer.output_dir={tmp_path}",
                 "trainer.run_name=teacher"]) == 0
    two = ("model.students=[{name: cnn, backbone: {name: resnet10t, kwargs: {in_chans: 1}}}, "
           "{name: vit, backbone: {name: vit_tiny_patch16_224, kwargs: {img_size: 28, patch_size: 4, depth: 1, "
           "embed_dim: 16, num_heads: 2, in_chans: 1}}}]")
    assert main(["train", "--config", "distill_tiny_cpu", *STUDENT_RUN, "trainer.epochs=1", two,
                 f"model.teacher={tmp_path / 'teacher'}", f"trainer.output_dir={tmp_path}",
                 "trainer.run_name=two"]) == 0
    run = str(tmp_path / "two")
    dims = {}
    for name in (None, "cnn", "vit"):
        pick = ["--student", name] if name else []
        out = tmp_path / f"emb-{name}"
        assert main(["embed", "--checkpoint", run, *pick, "--data", "digits", "--limit", "8", "--output",
                     str(out), "--no-progress"]) == 0
        dims[name] = np.load(f"{out}.npy").shape[1]
    assert dims == {None: 512, "cnn": 512, "vit": 16}  # resnet10t's 512 features, the ViT's width
    from dinokit.cli._common import load

    assert type(load(run, "student:vit").backbone.model).__name__ == "VisionTransformer"
    assert main(["export", "--checkpoint", run, "--student", "vit", "--output", str(tmp_path / "vit"),
                 "--format", "file"]) == 0
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", run, "--student", "nope", "--train-data", "digits", "--val-data", "digits"]) == 2
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "teacher"), "--student", "vit",
                 "--train-data", "digits", "--val-data", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope" in err[0] and "not a distillation" in err[1]
    assert "Traceback" not in "".join(err)
    teacher = str(tmp_path / "teacher")
    assert main(["embed", "--checkpoint", teacher, "--student", "vit", "--data", "digits", "--limit", "4",
                 "--output", str(tmp_path / "e"), "--no-progress"]) == 2
    assert main(["export", "--checkpoint", teacher, "--student", "vit", "--output", str(tmp_path / "x"),
                 "--format", "file"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("names a student of a distillation run" in line for line in err)
