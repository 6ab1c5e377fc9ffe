"""The scikit-learn estimator: parameter protocol, fit/transform, optimiser and scheduler choices,
weight-decay groups, last-layer freezing, Pipeline use and bad inputs."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from torch import nn

from dinokit import DINOEstimator

warnings.filterwarnings("ignore", module="lightning")


class TinyCNN(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def _images(n=48, seed=0):
    g = np.random.default_rng(seed)
    x = g.random((n, 1, 16, 16)).astype(np.float32)
    y = np.arange(n) % 2
    x[y == 1, :, 4:12, 4:12] += 1.0  # two visibly different kinds of image
    return np.clip(x, 0, 1), y


def _est(**kw):
    base = dict(encoder=TinyCNN, encoder_kwargs={"width": 8}, proj_hidden_dim=16, proj_bottleneck_dim=8,
                proj_output_dim=16, num_local_crops=2, batch_size=16, random_state=0, max_epochs=2,
                accelerator="cpu", enable_progress_bar=False, learning_rate=1e-2,
                lr_scheduler_kwargs={"warmup_epochs": 0})
    base.update(kw)
    return DINOEstimator(**base)


def test_params_round_trip_and_clone():
    kwargs = {"width": 8}
    est = _est(encoder_kwargs=kwargs)
    assert est.encoder_kwargs is kwargs  # stored unchanged
    params = est.get_params()
    assert params["max_epochs"] == 2 and params["accelerator"] == "cpu"
    twin = clone(est)
    assert twin.get_params()["max_epochs"] == 2 and twin is not est
    twin.set_params(max_epochs=5, learning_rate=0.1)
    assert twin.get_params()["max_epochs"] == 5 and twin.learning_rate == 0.1
    assert "max_epochs=2" in repr(est) and "proj_output_dim=16" in repr(est)
    assert "student_temperature" not in repr(est)  # defaults are not shown


def test_fit_array_lowers_loss_and_transforms():
    x, _ = _images()
    est = _est(max_epochs=4).fit(x)
    assert len(est.history_) == 4 and est.history_[-1] < est.history_[0]
    f = est.transform(x)
    assert isinstance(f, np.ndarray) and f.shape == (48, 8)
    assert est.encoder_ is est.teacher and est.student is not est.teacher
    assert isinstance(est.optimizer_, torch.optim.AdamW)


def test_fit_on_a_loader_of_view_lists():
    g = torch.Generator().manual_seed(0)
    batches = [([torch.rand(8, 1, 16, 16, generator=g), torch.rand(8, 1, 16, 16, generator=g),
                 torch.rand(8, 1, 8, 8, generator=g)], torch.zeros(8)) for _ in range(3)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    seen = []

    class Outputs(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs)

    est = _est(num_local_crops=1, max_epochs=1, callbacks=[Outputs()]).fit(loader)
    plain = torch.utils.data.DataLoader([(torch.rand(4, 1, 16, 16), torch.zeros(4))], batch_size=None)
    assert est.transform(plain).shape == (4, 8)
    assert len(seen) == 3 and set(seen[0]) == {"loss", "z_student", "z_teacher", "y"}
    assert seen[0]["z_student"].shape == (3, 8, 16) and seen[0]["z_teacher"].shape == (2, 8, 16)
    assert est.method_.step == 3  # one EMA update per optimiser step


@pytest.mark.parametrize(("opt", "cls"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                          ("adamW", torch.optim.AdamW), (torch.optim.RMSprop, torch.optim.RMSprop)])
def test_optimizer_choices(opt, cls):
    x, _ = _images(32)
    est = _est(optimizer=opt, max_epochs=1, lr_scheduler="none").fit(x)
    assert isinstance(est.optimizer_, cls)
    assert est.optimizer_.param_groups[0]["lr"] == pytest.approx(1e-2 * est.optimizer_.param_groups[0]["lr_scale"])


def test_optimizer_instance_keeps_its_hyper_parameters():
    x, _ = _images(32)
    template = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.7)
    est = _est(optimizer=template, max_epochs=1, lr_scheduler="none").fit(x)
    assert isinstance(est.optimizer_, torch.optim.SGD)
    assert est.optimizer_.param_groups[0]["momentum"] == 0.7
    assert est.optimizer_.param_groups[0]["lr"] == pytest.approx(0.05)


def test_scheduler_choices():
    x, _ = _images(32)
    warm = _est(max_epochs=2, lr_scheduler_kwargs={"warmup_epochs": 1, "warmup_start_lr": 0.0}).fit(x)
    lrs = warm.module_.lr_schedule
    assert lrs(0) == 0.0 and lrs(2) == pytest.approx(1e-2) and lrs(4) == pytest.approx(0.0)
    const = _est(max_epochs=1, lr_scheduler="none").fit(x)
    assert const.module_.lr_schedule(0) == const.module_.lr_schedule(3) == pytest.approx(1e-2)
    user = _est(max_epochs=2, lr_scheduler=torch.optim.lr_scheduler.StepLR,
                lr_scheduler_kwargs={"step_size": 1, "gamma": 0.5}).fit(x)
    assert isinstance(user.lr_scheduler_, torch.optim.lr_scheduler.StepLR)
    assert user.optimizer_.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)  # 4 steps


def test_bias_and_norm_weight_decay_groups():
    x, _ = _images(32)
    on = _est(max_epochs=1).fit(x)
    off = _est(max_epochs=1, exclude_bias_and_norm_wd=False).fit(x)
    assert {g["wd_scale"] for g in on.optimizer_.param_groups} == {0.0, 1.0}
    assert {g["wd_scale"] for g in off.optimizer_.param_groups} == {1.0}


def test_freeze_last_layer_keeps_prototypes_in_the_first_epoch():
    x, _ = _images(32)
    est = _est(max_epochs=1, freeze_last_layer=1, proj_norm_last_layer=False)
    torch.manual_seed(0)
    est.fit(x)
    frozen_before = est.method_.teacher_head.last_layer.weight_v  # teacher copy == initial student
    assert torch.equal(est.student_head.last_layer.weight_v, frozen_before)
    assert not torch.equal(est.student_head.mlp[0].weight, est.teacher_head.mlp[0].weight)


def test_not_fitted_and_pipeline():
    with pytest.raises(NotFittedError):
        _est().transform(_images()[0])
    x, y = _images(64)
    pipe = Pipeline([("dino", _est(max_epochs=1)), ("clf", LogisticRegression(max_iter=500))])
    pipe.fit(x, y)
    assert 0.0 <= pipe.score(x, y) <= 1.0


@pytest.mark.parametrize(("kw", "message"), [
    (dict(optimizer="adagrad"), "optimizer must be one of"),
    (dict(lr_scheduler="exp"), "lr_scheduler must be one of"),
    (dict(proj_input_dim=99), "proj_input_dim=99 but the encoder outputs 8"),
])
def test_bad_parameters(kw, message):
    with pytest.raises(ValueError, match=message):
        _est(**kw).fit(_images(32)[0])


def test_wrong_number_of_views():
    batches = [([torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)], torch.zeros(4))]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with pytest.raises(ValueError, match="batch has 2 views but num_local_crops=2 needs 4"):
        _est(max_epochs=1).fit(loader)
