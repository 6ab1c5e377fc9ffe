"""Every method's training forward (student, teacher, heads, every loss term) traces as one graph:
no graph breaks under ``torch._dynamo``, and the compiled forward gives the eager loss."""

from __future__ import annotations

import copy

import pytest
import torch

from dinokit import DINO, DINOv2, DINOv3
from dinokit.train.module import method_inputs, unpack_batch
from test_no_sync import _batches, _method

METHODS = [(DINO, False), (DINOv2, True), (DINOv3, True)]


@pytest.mark.parametrize("cls,masks", METHODS, ids=["dino", "dinov2", "dinov3"])
def test_method_forward_has_no_graph_breaks_and_compiles_to_the_eager_loss(cls, masks):
    torch._dynamo.reset()
    torch.manual_seed(0)
    method = _method(cls)
    method.check_finite = False  # the training step guards on the device instead
    inputs = method_inputs(unpack_batch(_batches(1, masks)[0]))
    explained = torch._dynamo.explain(copy.deepcopy(method))(**inputs)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    eager = copy.deepcopy(method).eval()
    compiled = torch.compile(copy.deepcopy(method).eval(), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(**inputs).loss, eager(**inputs).loss, rtol=1e-5, atol=1e-6)
