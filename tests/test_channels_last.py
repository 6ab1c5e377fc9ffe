"""Channels-last CNNs (``backbone.channels_last``): the same numbers in the NHWC layout that cuDNN's and
oneDNN's fastest convolutions use, for student and teacher alike, and exports unchanged."""

from __future__ import annotations

import timm
import torch
from safetensors.torch import load_file

from dinokit.backbones import ModuleBackbone, use_channels_last
from dinokit.config import load_config
from dinokit.export import export_backbone
from dinokit.train.build import build_method

NHWC = torch.channels_last


def _tiny_resnet() -> torch.nn.Module:
    return timm.create_model("resnet10t", num_classes=0, in_chans=3)


def _conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_backbone_gives_the_same_features_from_nhwc_weights_and_inputs():
    torch.manual_seed(0)
    plain = ModuleBackbone(_tiny_resnet()).eval()
    nhwc = ModuleBackbone(_tiny_resnet()).eval()
    nhwc.load_state_dict(plain.state_dict())
    nhwc.use_channels_last()
    seen: list[bool] = []
    first_conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=NHWC)))
    x = torch.randn(4, 3, 28, 28)  # a contiguous (NCHW) batch from the loader
    with torch.no_grad():
        a, b = plain(x), nhwc(x)
    assert seen == [True], "the input reached the first convolution in NCHW"
    assert all(w.is_contiguous(memory_format=NHWC) for w in _conv_weights(nhwc))
    assert not any(w.is_contiguous(memory_format=NHWC) for w in _conv_weights(plain) if w.shape[1] > 1 and w.shape[-1] > 1)
    torch.testing.assert_close(b.cls, a.cls, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.patches, a.patches, rtol=1e-4, atol=1e-5)


def test_build_method_puts_student_and_teacher_cnns_in_channels_last_by_default_and_leaves_vits():
    cnn = build_method(load_config("demo_cnn", []))
    for backbone in (cnn.student_backbone, cnn.teacher_backbone):
        assert backbone.channels_last
        assert all(w.is_contiguous(memory_format=NHWC) for w in _conv_weights(backbone))
    off = build_method(load_config("demo_cnn", ["backbone.channels_last=false"]))
    assert not off.student_backbone.channels_last and not off.teacher_backbone.channels_last
    assert use_channels_last(build_method(load_config("demo", []))) == 0  # a ViT: nothing to change


def test_training_step_and_ema_agree_between_layouts():
    """One forward/backward/EMA update in each layout: same loss, gradients and teacher."""
    runs = []
    for flag in ("true", "false"):
        torch.manual_seed(0)
        method = build_method(load_config("demo_cnn", [f"backbone.channels_last={flag}", "crops.n_local=2"]))
        g = torch.Generator().manual_seed(1)
        glob = [torch.randn(4, 1, 28, 28, generator=g) for _ in range(2)]
        loc = [torch.randn(4, 1, 16, 16, generator=g) for _ in range(2)]
        out = method(global_views=glob, local_views=loc)
        out.loss.backward()
        with torch.no_grad():
            for p in method.student_parameters():
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
        method.update_teacher(0.9)
        grads = [p.grad.contiguous() for p in method.student_parameters() if p.grad is not None]
        teacher = [p.detach().contiguous() for p in method.teacher_backbone.parameters()]
        runs.append((out.loss.detach(), grads, teacher))
    (la, ga, ta), (lb, gb, tb) = runs
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)
    for x, y in zip(ta, tb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_export_of_a_channels_last_model_loads_into_plain_timm(tmp_path):
    method = build_method(load_config("demo_cnn", []))
    assert method.teacher_backbone.channels_last
    path = export_backbone(method, tmp_path / "cnn")
    state = load_file(str(path))
    model = timm.create_model("resnet10t", num_classes=0, in_chans=1)
    model.load_state_dict(state)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), method.teacher_backbone.eval()(x).cls, rtol=1e-4, atol=1e-5)


def test_estimator_fits_cnns_in_channels_last_unless_told_not_to():
    import numpy as np

    from dinokit import DINOEstimator

    x = np.random.default_rng(0).random((16, 1, 16, 16)).astype(np.float32)
    kw = dict(proj_hidden_dim=16, proj_bottleneck_dim=8, proj_output_dim=16, num_local_crops=2, batch_size=8,
              random_state=0, max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    encoder = _tiny_resnet_1ch()  # an instance: each fit trains a copy of it
    est = DINOEstimator(encoder, **kw).fit(x)
    assert est.encoder_.channels_last and est.student.channels_last
    assert all(w.is_contiguous(memory_format=NHWC) for w in _conv_weights(est.encoder_))
    off = DINOEstimator(encoder, channels_last=False, **kw).fit(x)
    assert not off.encoder_.channels_last
    np.testing.assert_allclose(off.transform(x), est.transform(x), rtol=1e-3, atol=1e-4)


def _tiny_resnet_1ch() -> torch.nn.Module:
    return timm.create_model("resnet10t", num_classes=0, in_chans=1)


def test_a_channels_last_method_exports_a_timm_folder_from_python(tmp_path):
    """Python front doors default to channels-last CNNs too (``backbone.channels_last``): the timm
    folder is written contiguous (safetensors refuses strided tensors) and gives the same features."""
    import timm

    import dinokit
    from dinokit.export import export_timm_folder

    torch.manual_seed(0)
    method = dinokit.DINO("resnet18", encoder_kwargs=dict(in_chans=1), n_prototypes=16, projector_hidden_dim=16,
                          projector_bottleneck_dim=8)
    assert method.teacher_backbone.channels_last
    folder = export_timm_folder(method, tmp_path / "hub")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        got = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(got, method.teacher_backbone.eval()(x).cls, rtol=1e-5, atol=1e-6)
