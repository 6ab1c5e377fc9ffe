"""Every method's training forward (student, teacher, heads, every loss term) traces as one graph:
no graph breaks under ``torch._dynamo``, and the compiled forward gives the eager loss."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import step_settings
from dinokit import DINO, DINOv2, DINOv3
from dinokit.train.module import method_inputs, unpack_batch
from test_no_sync import _batches, _method

METHODS = [(DINO, False), (DINOv2, True), (DINOv3, True)]


@pytest.mark.parametrize("cls,masks,packed", [(c, m, None) for c, m in METHODS] + [(DINOv2, True, True)],
                         ids=["dino", "dinov2", "dinov3", "dinov2-packed"])
def test_method_forward_has_no_graph_breaks_and_compiles_to_the_eager_loss(cls, masks, packed):
    torch._dynamo.reset()
    torch.manual_seed(0)
    method = _method(cls)
    method.check_finite = False  # the training step guards on the device instead
    if packed is not None:  # sequence-packed multi-crop (backbone.packed_crops=true)
        method.student_backbone.packed_crops = packed
    inputs = method_inputs(unpack_batch(_batches(1, masks)[0]))
    explained = torch._dynamo.explain(copy.deepcopy(method))(**inputs)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    eager = copy.deepcopy(method).eval()
    compiled = torch.compile(copy.deepcopy(method).eval(), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(**inputs).loss, eager(**inputs).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,masks", METHODS[:2], ids=["dino", "dinov2"])
def test_compiled_training_steps_match_eager_and_do_not_recompile_every_step(cls, masks):
    """method.compile() (what trainer.compile=true does) inside the one training step: the step,
    the teacher temperature and the weights change every step without a new graph each time."""
    from torch._dynamo.utils import counters

    from dinokit.train.step import TrainingStep, build_method_optimizer

    torch.manual_seed(0)
    start = _method(cls)
    start.warmup_epochs_temperature_teacher = 3  # the temperature moves in every epoch below
    batches = _batches(6, masks)
    losses = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        counters.clear()
        method = copy.deepcopy(start)
        step = TrainingStep(method, build_method_optimizer(method), step_settings(warmup_epochs=0))
        step.plan(6, 1, 4)
        if mode == "compiled":
            method.compile(backend="aot_eager")
        losses[mode] = [step(b, step=i, epoch=i).metrics["loss"] for i, b in enumerate(batches)]
        if mode == "compiled":
            assert counters["stats"]["unique_graphs"] <= 3  # not one per step
    torch.testing.assert_close(torch.stack(losses["compiled"]), torch.stack(losses["eager"]), rtol=1e-4,
                               atol=1e-5)


def test_inductor_compiled_step_keeps_the_autograd_graph_and_trains():
    """The default backend (what trainer.compile=true uses): the compiled loss has a gradient and
    a step moves the student (inductor once dropped the graph of a loss returned beside a
    detached alias of itself)."""
    from dinokit.train.step import TrainingStep, build_method_optimizer

    torch._dynamo.reset()
    torch.manual_seed(0)
    method = _method(DINO)
    step = TrainingStep(method, build_method_optimizer(method),
                        step_settings(warmup_epochs=0, freeze_last_layer_epochs=0))
    step.plan(2, 2, 4)
    eager = copy.deepcopy(method)(**method_inputs(unpack_batch(_batches(1, False)[0]))).loss
    method.compile()
    before = method.student_backbone.model.cls_token.detach().clone()
    out = step(_batches(1, False)[0], step=0, epoch=0).output
    assert out.loss.grad_fn is not None
    torch.testing.assert_close(out.loss.detach(), eager.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.equal(method.student_backbone.model.cls_token, before)
