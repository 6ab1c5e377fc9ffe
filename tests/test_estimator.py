"""The scikit-learn estimator: parameter protocol, fit/transform, optimiser and scheduler choices,
weight-decay groups, last-layer freezing, Pipeline use and bad inputs."""

from __future__ import annotations

import io
import math
import pickle
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
from dinokit.clock import Clock

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
    assert est.trainer_.global_step == 3  # one optimiser step per batch


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


class LRs(pl.Callback):
    """The learning rate each optimiser step used (group with lr_scale 1)."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(next(g["lr"] for g in optimizer.param_groups if g["lr_scale"] == 1.0))


def _lrs(**kw):
    rec = LRs()
    est = _est(callbacks=[rec], **kw).fit(_images(32)[0])  # 32 images / batch 16: 2 steps per epoch
    return est, rec.lrs


def _cos(p):
    return 1e-2 * 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize(("interval", "expected"), [
    # 6 steps, warm-up over 2 steps reaching the peak at its last step (np.linspace, as DINO's
    # cosine_scheduler and pl_bolts' LinearWarmupCosineAnnealingLR do), then a cosine over 4 steps
    ("step", [0.0, 1e-2, 1e-2, _cos(1 / 4), _cos(2 / 4), _cos(3 / 4)]),
    ("epoch", [0.0, 0.0, 1e-2, 1e-2, _cos(1 / 2), _cos(1 / 2)]),  # 3 epochs, warm-up 1 epoch
])
def test_warmup_cosine_follows_its_interval(interval, expected):
    kw = {"warmup_epochs": 1, "warmup_start_lr": 0.0, "min_lr": 0.0, "interval": interval}
    est, lrs = _lrs(max_epochs=3, lr_scheduler_kwargs=kw)
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert isinstance(est.lr_scheduler_, Clock)  # the one clock of every front door drove it
    assert [est.lr_scheduler_.lr(s) for s in range(6)] == pytest.approx(expected, abs=1e-12)


def test_no_scheduler_keeps_the_learning_rate():
    est, lrs = _lrs(max_epochs=1, lr_scheduler="none")
    assert lrs == pytest.approx([1e-2, 1e-2]) and est.lr_scheduler_ is None


@pytest.mark.parametrize(("interval", "expected"), [("step", [1e-2, 5e-3, 2.5e-3, 1.25e-3]),
                                                    ("epoch", [1e-2, 1e-2, 5e-3, 5e-3])])
def test_scheduler_class_and_instance(interval, expected):
    step = torch.optim.lr_scheduler.StepLR
    _, by_class = _lrs(lr_scheduler=step, lr_scheduler_kwargs={"step_size": 1, "gamma": 0.5,
                                                                "interval": interval})
    template = step(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=123.0), step_size=1, gamma=0.5)
    est, by_instance = _lrs(lr_scheduler=template, lr_scheduler_kwargs={"interval": interval})
    assert by_class == pytest.approx(expected) and by_instance == pytest.approx(expected)
    assert isinstance(est.lr_scheduler_, step) and est.lr_scheduler_ is not template
    assert est.lr_scheduler_.optimizer is est.optimizer_
    assert template.optimizer.param_groups[0]["lr"] == 123.0  # the template is left alone


def test_scheduler_instance_that_cannot_be_rebuilt():
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), max_lr=0.1, total_steps=10)
    with pytest.raises(ValueError, match="OneCycleLR's argument 'max_lr'.*lr_scheduler_kwargs"):
        _est(lr_scheduler=one_cycle).fit(_images(32)[0])


class Halving(torch.optim.lr_scheduler.StepLR):
    """A scheduler whose constructor argument is stored under another name."""

    def __init__(self, optimizer, every=1):
        super().__init__(optimizer, step_size=every, gamma=0.5)


def test_scheduler_instance_with_unreadable_settings_is_refused():
    template = Halving(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), every=3)
    with pytest.raises(ValueError, match=r"cannot rebuild Halving faithfully.*\['step_size'\]"):
        _est(lr_scheduler=template).fit(_images(32)[0])
    _, lrs = _lrs(lr_scheduler=Halving(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)),
                  lr_scheduler_kwargs=None)
    assert lrs == pytest.approx([1e-2, 5e-3, 2.5e-3, 1.25e-3])  # every=1 is the default: rebuilt


def test_plateau_scheduler_monitors_the_training_loss():
    _, lrs = _lrs(max_epochs=3, lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau,
                  lr_scheduler_kwargs={"patience": 0, "factor": 0.5, "mode": "max", "interval": "epoch"})
    assert lrs[:2] == pytest.approx([1e-2, 1e-2]) and lrs[-1] < 1e-2  # a falling loss is "worse" in max mode


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
    assert torch.allclose(est.student_head.last_layer.weight_v, frozen_before, atol=1e-6, rtol=0)
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
    (dict(lr_scheduler_kwargs={"interval": "epochs"}), r"\['interval'\] must be one of \('step', 'epoch'\)"),
    (dict(lr_scheduler_kwargs={"step_size": 2}), r"\['step_size'\] are not settings of 'warmup_cosine'"),
    (dict(lr_scheduler=42), "lr_scheduler must be 'none', 'warmup_cosine', a torch LR scheduler class"),
])
def test_bad_parameters(kw, message):
    with pytest.raises(ValueError, match=message):
        _est(**kw).fit(_images(32)[0])


def test_wrong_number_of_views():
    batches = [([torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)], torch.zeros(4))]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with pytest.raises(ValueError, match="batch has 2 views but num_local_crops=2 needs 4"):
        _est(max_epochs=1).fit(loader)


# ---------------------------------------------------------------------- seed 003's calls
def _view_loader(n_batches, seed, n_local=2, bsz=8):
    g = torch.Generator().manual_seed(seed)
    batches = [([torch.rand(bsz, 1, 16, 16, generator=g) for _ in range(2)]
                + [torch.rand(bsz, 1, 8, 8, generator=g) for _ in range(n_local)], torch.zeros(bsz))
               for _ in range(n_batches)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def test_seed_fit_with_a_validation_loader():
    val_outputs = []

    class Val(pl.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if not trainer.sanity_checking:
                val_outputs.append(outputs)

    est = _est(max_epochs=2, callbacks=[Val()], num_sanity_val_steps=0)
    est.fit(_view_loader(3, 0), _view_loader(2, 1))  # seed 003: fit(train_dataloader, val_dataloader)
    assert len(val_outputs) == 4 and set(val_outputs[0]) == {"loss", "z_student", "z_teacher", "y"}
    assert val_outputs[0]["z_student"].shape == (4, 8, 16) and val_outputs[0]["z_teacher"].shape == (2, 8, 16)
    assert len(est.val_history_) == 2
    assert est.val_history_[-1] == pytest.approx(float(sum(o["loss"] for o in val_outputs[2:])) / 2)
    assert float(est.trainer_.callback_metrics["val/loss"]) == pytest.approx(est.val_history_[-1])
    est2 = _est(max_epochs=1, num_sanity_val_steps=0).fit(_view_loader(3, 0), val_dataloader=_view_loader(1, 1))
    assert len(est2.val_history_) == 1
    with pytest.raises(ValueError, match="both as y and as val_dataloader"):
        _est().fit(_view_loader(1, 0), _view_loader(1, 1), val_dataloader=_view_loader(1, 1))


def test_seed_transform_step():
    est = _est(max_epochs=1)
    x = torch.rand(5, 1, 16, 16)
    with pytest.raises(NotFittedError):
        est.transform_step(x, 0)
    est.fit(_view_loader(2, 0))
    feats = est.transform_step(x, 0, dataloader_idx=0)  # seed 003: transform_step(batch, batch_idx, ...)
    teacher = est.teacher.eval()
    with torch.no_grad():
        want = teacher(x).cls
    assert feats.shape == (5, 8) and torch.allclose(feats, want)
    assert not torch.allclose(feats, est.student.eval()(x).cls)  # the teacher, not the student
    assert torch.allclose(est.transform_step((x, torch.zeros(5)), 3), feats)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(5)), batch_size=2)
    assert torch.allclose(est.transform(loader), feats, atol=1e-6)


@pytest.mark.parametrize("kw", [
    {},
    {"lr_scheduler": "none", "optimizer": torch.optim.SGD},
    {"optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.7),
     "lr_scheduler": torch.optim.lr_scheduler.StepLR(
         torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), step_size=1, gamma=0.5),
     "lr_scheduler_kwargs": None},
    {"lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR,
     "lr_scheduler_kwargs": {"T_max": 2, "interval": "epoch"}},
], ids=["default", "none+class", "instances", "class+epoch"])
def test_fitted_estimator_pickles(kw):
    x, _ = _images(32)
    est = _est(max_epochs=1, **kw).fit(x)
    back = pickle.loads(pickle.dumps(est))
    buf = io.BytesIO()
    torch.save(est, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (back, loaded):
        assert np.allclose(other.transform(x[:4]), est.transform(x[:4]))
        assert type(other.optimizer_) is type(est.optimizer_) and other.history_ == est.history_
        assert other.get_params().keys() == est.get_params().keys()
        if isinstance(est.lr_scheduler_, torch.optim.lr_scheduler.LRScheduler):
            assert other.lr_scheduler_.optimizer is other.optimizer_
    assert clone(back).get_params()["max_epochs"] == 1


def test_misspelled_parameter_fails_at_once_naming_the_closest():
    est = _est()
    with pytest.raises(ValueError, match="invalid parameter 'learning_rat'.*did you mean 'learning_rate'"):
        est.set_params(learning_rat=0.1)
    with pytest.raises(ValueError, match="'max_epoch'.*did you mean 'max_epochs'"):
        est.set_params(max_epoch=3)
    with pytest.raises(ValueError, match="'proj_output_dimm'.*did you mean 'proj_output_dim'"):
        _est(proj_output_dimm=8)
    assert est.learning_rate == 1e-2 and est.get_params()["max_epochs"] == 2  # nothing half-applied
    est.set_params(max_epochs=3, check_val_every_n_epoch=2)  # Trainer names stay valid
    assert clone(est).get_params()["check_val_every_n_epoch"] == 2


def test_fit_without_validation_data_shows_no_lightning_noise():
    """The estimator's optional validation step, fitted without validation data, is not a user
    mistake: Lightning's notice about it stays out of the output (other warnings still show)."""
    x, _ = _images(n=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _est(max_epochs=1).fit(x)
    shown = [str(w.message) for w in caught]
    assert not [m for m in shown if "validation_step" in m or "LeafSpec" in m], shown
