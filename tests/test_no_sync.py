"""The training step never synchronises host and device outside logging steps: no ``.item()``,
no ``nonzero``, no boolean-mask indexing (a hidden ``nonzero``), no tensor-to-Python conversion, counted under a
``TorchDispatchMode`` over several steps of DINO, DINOv2 and DINOv3 in both loops."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import step_settings, tiny_vit
from dinokit import DINO, DINOv2, DINOv3
from dinokit.data import MultiCropCollate
from dinokit.masking import make_mask_generator
from dinokit.train import DINOModule, DINOTrainer

SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default",
         "aten.is_nonzero.default"}


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNCS or name == "aten.masked_select.default":
            self.count += 1
        elif name.startswith(("aten.index.", "aten.index_put")):  # boolean-mask indexing: a nonzero inside
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.count += 1
        return func(*args, **(kwargs or {}))


def _method(cls):
    kw = dict(projector_hidden_dim=32, projector_bottleneck_dim=16)
    kw["n_cls_prototypes" if cls is DINOv3 else "n_prototypes"] = 24
    if cls is not DINO:
        kw["n_patch_prototypes"] = 12
    method = cls(tiny_vit(num_registers=4 if cls is DINOv3 else 0), **kw)
    method.set_run_length(100, 10)  # driven by hand in some tests: the per-step warm-up's epoch length
    return method


def _batches(n, masks):
    g = torch.Generator().manual_seed(0)
    collate = MultiCropCollate(make_mask_generator("block", (4, 4)), patch_size=8) if masks \
        else MultiCropCollate()
    items = lambda: [({"global_views": [torch.randn(3, 32, 32, generator=g) for _ in range(2)],  # noqa: E731
                       "local_views": [torch.randn(3, 16, 16, generator=g) for _ in range(2)]}, 0)
                     for _ in range(4)]
    return [collate(items()) for _ in range(n)]


METHODS = [(DINO, False), (DINOv2, True), (DINOv3, True)]


@pytest.mark.parametrize("cls,masks", METHODS, ids=["dino", "dinov2", "dinov3"])
def test_plain_trainer_steps_do_not_sync(cls, masks):
    mode = CountSyncs()
    seen: list[int] = []  # syncs counted so far, each time the loop asks for its next batch

    class Watched(list):
        def __iter__(self):
            for b in super().__iter__():
                seen.append(mode.count)
                yield b

    trainer = DINOTrainer(_method(cls), Watched(_batches(4, masks)), epochs=1, device="cpu")
    with mode:
        trainer.train_epoch()
    assert seen == [0, 0, 0, 0]  # no step read anything back
    assert mode.count <= 1  # the epoch's loss and guard, one read at the end (.tolist())


class PerStep(pl.Callback):
    def __init__(self):
        self.mode, self.counts = CountSyncs(), []

    def on_train_batch_start(self, *args):
        self.mode.count = 0
        self.mode.__enter__()

    def on_train_batch_end(self, *args):
        self.mode.__exit__(None, None, None)
        self.counts.append(self.mode.count)


@pytest.mark.parametrize("cls,masks", METHODS, ids=["dino", "dinov2", "dinov3"])
def test_lightning_steps_do_not_sync_outside_logging_steps(cls, masks, tmp_path):
    counter = PerStep()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=4,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[counter])
    loader = torch.utils.data.DataLoader(_batches(6, masks), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DINOModule(_method(cls), step_settings(warmup_epochs=0)), loader)
    assert [c for i, c in enumerate(counter.counts) if i % 4] == [0, 0, 0, 0]


def test_estimator_steps_do_not_sync_outside_logging_steps():
    from dinokit.estimator import DINOEstimator

    counter = PerStep()
    est = DINOEstimator(tiny_vit(), proj_hidden_dim=32, proj_bottleneck_dim=16, proj_output_dim=24,
                        num_local_crops=2, clip_grad=3.0, batch_size=4, max_epochs=1, accelerator="cpu",
                        enable_progress_bar=False, log_every_n_steps=4, callbacks=[counter])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(torch.utils.data.DataLoader(_batches(6, False), batch_size=None))
    assert len(counter.counts) == 6
    assert [c for i, c in enumerate(counter.counts) if i % 4] == [0, 0, 0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("cls,masks", METHODS, ids=["dino", "dinov2", "dinov3"])
def test_cuda_steps_pass_under_sync_debug_mode_error(cls, masks):
    """On a GPU, torch itself raises on any synchronising call inside the steps."""
    from dinokit.train.step import TrainingStep, build_method_optimizer

    method = _method(cls).cuda()
    step = TrainingStep(method, build_method_optimizer(method), step_settings(warmup_epochs=0))
    step.plan(4, 4, 4)
    batches = [{k: ([t.cuda() for t in v] if isinstance(v, list) else
                    v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
               for b in _batches(4, masks)]
    step(batches[0], step=0, epoch=0)  # first call: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, b in enumerate(batches[1:], start=1):
            step(b, step=i, epoch=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
