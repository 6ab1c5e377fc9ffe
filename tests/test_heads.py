"""The DINO projection head (Caron et al. 2021, Sec. 3.1 and Appendix): a 3-layer MLP (hidden
2048, bottleneck 256, GELU), L2 normalisation, then a weight-normalised bias-free prototype layer
``w_k = g_k v_k / ||v_k||`` whose gain is fixed at 1 by default (``norm_last_layer``)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from dinokit.heads import DINOHead


def _layers(head):
    return [type(m).__name__ for m in head.mlp]


def test_default_architecture_is_the_papers():
    """Linear(d, 2048)-GELU-Linear(2048, 2048)-GELU-Linear(2048, 256), then K = 65536 prototypes."""
    defaults = {k: v.default for k, v in inspect.signature(DINOHead).parameters.items()}
    assert (defaults["out_dim"], defaults["hidden_dim"], defaults["bottleneck_dim"]) == (65536, 2048, 256)
    assert (defaults["layers"], defaults["batch_norm"], defaults["norm_last_layer"]) == (3, False, True)

    head = DINOHead(384, out_dim=64)  # K kept small: the default 65536 x 256 layer is slow to build
    assert _layers(head) == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    shapes = [(m.in_features, m.out_features) for m in head.mlp if isinstance(m, nn.Linear)]
    assert shapes == [(384, 2048), (2048, 2048), (2048, 256)]
    assert head.last_layer.weight_v.shape == (64, 256)
    assert [n for n, _ in head.last_layer.named_parameters()] == ["weight_v", "weight_g"]  # no bias


def test_batch_norm_after_each_hidden_linear():
    """batch_norm (for CNN backbones): Linear-BN-GELU for each hidden layer, none after the last."""
    head = DINOHead(8, out_dim=16, hidden_dim=32, bottleneck_dim=8, batch_norm=True)
    assert _layers(head) == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert [m.num_features for m in head.mlp if isinstance(m, nn.BatchNorm1d)] == [32, 32]
    assert _layers(DINOHead(8, 16, 32, 8, layers=1)) == ["Linear"]


def test_logits_are_cosines_between_bottleneck_and_prototypes():
    """With g = 1 the output is cos(z, v_k), z = mlp(x): computed here by hand in float64."""
    torch.manual_seed(0)
    head = DINOHead(6, out_dim=5, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(3, 6)
    z = head.mlp(x).double()
    v = head.last_layer.weight_v.double()
    cos = torch.stack([torch.stack([zi @ vk / (zi.norm() * vk.norm()) for vk in v]) for zi in z])
    torch.testing.assert_close(head(x).double(), cos, atol=1e-6, rtol=1e-5)


def test_logits_are_gain_times_cosine():
    """``g_k * cos(z, v_k)``: setting the gain per prototype scales that prototype's logit."""
    torch.manual_seed(0)
    head = DINOHead(6, out_dim=3, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    x = torch.randn(2, 6)
    cosines = head(x).detach()
    with torch.no_grad():
        head.last_layer.weight_g.copy_(torch.tensor([[2.0], [0.5], [-1.0]]))
    torch.testing.assert_close(head(x), cosines * torch.tensor([2.0, 0.5, -1.0]))


def _one_sgd_step(head, cancel_last_layer=False):
    opt = torch.optim.SGD(head.parameters(), lr=1.0, weight_decay=0.1)
    head(torch.randn(5, head.mlp[0].in_features)).pow(2).sum().backward()
    if cancel_last_layer:
        head.cancel_last_layer_gradients()
    opt.step()


def test_fixed_gain_is_frozen_at_one():
    """norm_last_layer=True: g has no gradient and is still exactly 1 after an optimiser step."""
    torch.manual_seed(0)
    head = DINOHead(4, out_dim=3, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    assert not head.last_layer.weight_g.requires_grad
    _one_sgd_step(head)
    assert head.last_layer.weight_g.grad is None
    assert torch.equal(head.last_layer.weight_g, torch.ones(3, 1))


def test_trainable_gain_learns():
    """norm_last_layer=False: the same step gives g a gradient and moves it away from 1."""
    torch.manual_seed(0)
    head = DINOHead(4, out_dim=3, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    assert head.last_layer.weight_g.requires_grad
    _one_sgd_step(head)
    assert head.last_layer.weight_g.grad is not None
    assert not torch.equal(head.last_layer.weight_g, torch.ones(3, 1))


def test_mlp_init_is_truncated_normal_std_002_with_zero_bias():
    """MLP Linear weights ~ trunc_normal(std=0.02), biases 0, as DINO's ``_init_weights``.

    DINO calls ``trunc_normal_(w, std=.02)`` whose cut-off is a = -2, b = 2 in *absolute* units
    (100 std), so the weights are, in effect, N(0, 0.02^2): std 0.02 and ~4.55% of them beyond
    2 std (0.04). A cut at +-2 std would give std 0.0176 and nothing beyond 0.04.
    """
    torch.manual_seed(0)
    head = DINOHead(64, out_dim=8)  # the hidden layer is 2048 x 2048 = 4M weights
    w = head.mlp[2].weight
    assert w.std().item() == pytest.approx(0.02, rel=0.01)
    assert abs(w.mean().item()) < 1e-4
    beyond_2_std = (w.abs() > 0.04).float().mean().item()
    assert beyond_2_std == pytest.approx(0.0455, abs=0.002)
    assert w.abs().max().item() < 2.0
    for lin in (m for m in head.mlp if isinstance(m, nn.Linear)):
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))


def test_cancelled_last_layer_is_left_unchanged_by_a_step():
    """DINO freezes the prototypes during the first epoch: with the gradients cancelled an SGD
    step (with weight decay) leaves v and g exactly as they were, while the MLP still learns."""
    torch.manual_seed(0)
    head = DINOHead(4, out_dim=3, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    _one_sgd_step(head, cancel_last_layer=True)
    after = dict(head.named_parameters())
    assert torch.equal(after["last_layer.weight_v"], before["last_layer.weight_v"])
    assert torch.equal(after["last_layer.weight_g"], before["last_layer.weight_g"])
    assert not torch.equal(after["mlp.0.weight"], before["mlp.0.weight"])


def test_without_cancelling_the_last_layer_moves():
    """Control for the test above: the identical step without cancelling changes v and g."""
    torch.manual_seed(0)
    head = DINOHead(4, out_dim=3, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    _one_sgd_step(head, cancel_last_layer=False)
    assert not torch.equal(head.last_layer.weight_v, before["last_layer.weight_v"])
    assert not torch.equal(head.last_layer.weight_g, before["last_layer.weight_g"])


@pytest.mark.parametrize("arg", ["in_dim", "out_dim", "hidden_dim", "bottleneck_dim", "layers"])
def test_sizes_below_one_name_the_argument(arg):
    kwargs = dict(in_dim=4, out_dim=3, hidden_dim=8, bottleneck_dim=4, layers=3)
    kwargs[arg] = 0
    with pytest.raises(ValueError, match=f"{arg} must be >= 1"):
        DINOHead(**kwargs)


def test_dinov3_head_has_plain_prototypes_and_every_option_is_named():
    head = DINOHead(4, out_dim=3, hidden_dim=8, bottleneck_dim=4, weight_norm=False)
    assert isinstance(head.last_layer, nn.Linear) and head.last_layer.bias is None
    assert [n for n, _ in head.last_layer.named_parameters()] == ["weight"]
    assert head.last_layer_parameters() == [head.last_layer.weight]
    assert "weight_norm" in inspect.signature(DINOHead).parameters


def test_init_official_trunc_normal_or_torchs_own():
    """``trunc_normal`` (official): weights N(0, 0.02) cut at +-2 (absolute), zero biases; ``torch``:
    ``nn.Linear``'s kaiming-uniform, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases,
    so a 256-wide input gives std 1/16/sqrt(3) = 0.036."""
    torch.manual_seed(0)
    official = DINOHead(256, out_dim=512, hidden_dim=1024, bottleneck_dim=256, weight_norm=False)
    torch.manual_seed(0)
    own = DINOHead(256, out_dim=512, hidden_dim=1024, bottleneck_dim=256, weight_norm=False, init="torch")
    first, first_own = official.mlp[0], own.mlp[0]
    assert first.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.count_nonzero(first.bias) == 0
    bound = 1 / 256**0.5
    assert first_own.weight.abs().max().item() <= bound
    assert first_own.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)
    assert torch.count_nonzero(first_own.bias) == first_own.bias.numel()
    assert official.last_layer.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert own.last_layer.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)
    with pytest.raises(ValueError, match="init"):
        DINOHead(8, out_dim=4, init="xavier")


def test_head_init_setting_reaches_every_head():
    from dinokit.config import load_config
    from dinokit.train.build import build_method

    method = build_method(load_config("dinov3_tiny_cpu", ["heads.init=torch"]))
    for name in ("head", "patch_head"):
        assert torch.count_nonzero(method.student[name].mlp[0].bias) > 0, name
    method = build_method(load_config("dinov3_tiny_cpu"))
    assert torch.count_nonzero(method.student["head"].mlp[0].bias) == 0
