"""FSDP2 (``fully_shard``) training, on CPU with 2 gloo processes: a plain loop (forward, backward,
the official clipping on the sharded gradients, AdamW, EMA teacher on the local shards) equals the
same steps in 1 process on the full batch; checkpoints gathered to full tensors resume at the other
world size (2 -> 1 and 1 -> 2 processes). DINO (per-parameter clipping, EMA centre) and DINOv2
(per-module clipping, Sinkhorn-Knopp, iBOT masks drawn per sample, KoLeo over the global batch).

``fully_shard`` runs on CPU with gloo in this torch (2.14); the loop here is what the training step
must do under FSDP (see ``dinokit.train.strategy``).
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import full_last_block, settings
from dinokit.data import MultiCropCollate
from dinokit.masking import make_mask_generator
from dinokit.train.optim import clip_per_module_, clip_per_parameter_
from dinokit.train.strategy import (
    clip_per_parameter_sharded_,
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    shard_method,
)

GLOBAL_BATCH, STEPS, RESUME_AT, CLIP = 8, 3, 2, 0.05
METHOD = "dino"  # set per test, before the workers fork


def _method():
    from dinokit import DINO, DINOv2
    from dinokit.backbones import build_backbone

    torch.manual_seed(0)
    vit = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)
    common = dict(projector_hidden_dim=32, projector_bottleneck_dim=16, n_prototypes=16, ema_decay_start=0.8,
                  ema_decay_end=1.0)
    if METHOD == "dino":
        method = DINO(build_backbone("vit_tiny_patch16_224", encoder_kwargs=vit), **common,
                      warmup_epochs_temperature_teacher=0)
        method.set_run_length(STEPS)
        # FSDP2's hooked blocks run the full last block, so the 1-process reference does too: the
        # key bias has an analytically zero gradient, and AdamW turns its rounding noise into
        # lr-sized steps, so both sides must round alike (the CLS-only block is tested elsewhere)
        full_last_block(method.student_backbone, method.teacher_backbone)
        return method
    method = DINOv2("vit_tiny_patch16_224", encoder_kwargs=vit, n_patch_prototypes=16, **common,
                    settings=settings(koleo={"all_processes": True}, teacher={"warmup_epochs": 0}))
    method.set_run_length(STEPS)
    return method


def _batch(step: int, rows: slice) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    glob = [torch.rand(GLOBAL_BATCH, 3, 32, 32, generator=g)[rows] for _ in range(2)]
    loc = [torch.rand(GLOBAL_BATCH, 3, 16, 16, generator=g)[rows] for _ in range(2)]
    batch = {"global_views": glob, "local_views": loc}
    if METHOD == "dinov2":  # iBOT masks drawn per sample: the same for an image in either process
        collate = MultiCropCollate(make_mask_generator("block", (4, 4)), patch_size=8, mask_sampling="sample")
        seeds = [1000 * step + i for i in range(GLOBAL_BATCH)][rows]
        batch.update(collate.batch_masks(len(seeds), 2, (4, 4), seeds))
    return batch


def _optimizer(method):
    return torch.optim.AdamW(method.student_parameters(), lr=LR, weight_decay=0.04)


def _train(method, opt, steps: range, rows: slice, sharded: bool) -> list:
    """The loop the training step runs; returns the per-parameter gradient norms of each step."""
    norms = []
    for step in steps:
        out = method(**_batch(step, rows))
        out.loss.backward()
        params = method.student_parameters()
        # the training step's non-finite guard: from sharded gradients it is a DTensor flag
        finite = torch.isfinite(torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None])))
        finite = finite.all() & torch.isfinite(out.loss.detach())
        if METHOD == "dinov2":  # DINOv2: clip_grad_norm_ per module (DTensor-aware in torch)
            per_module = clip_per_module_({k: v.parameters() for k, v in method.student.items()}, CLIP)
            norms.append(torch.stack([_full(n) for n in per_module.values()]))
        elif sharded:  # DINO: per parameter, the squared shards summed over the processes
            norms.append(clip_per_parameter_sharded_(params, CLIP))
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norms.append(torch.stack(torch._foreach_norm(grads)))
            clip_per_parameter_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.update_teacher(apply=finite)
    return norms


def _full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if callable(getattr(x, "full_tensor", None)) else x


def _checkpoint(method, opt) -> dict:
    """What a checkpoint file holds (a copy: unsharded state dicts share the live tensors)."""
    ckpt = {"model": full_state_dict(method), "optim": full_optimizer_state_dict(method.student, opt)}
    return copy.deepcopy(ckpt)


def _resume(method, opt, ckpt: dict) -> None:
    load_full_state_dict(method, ckpt["model"])
    load_full_optimizer_state_dict(method.student, opt, ckpt["optim"])


def _worker(rank: int, init: str, one_process_ckpt: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    rows = slice(rank * GLOBAL_BATCH // 2, (rank + 1) * GLOBAL_BATCH // 2)
    method = _method()
    shard_method(method)
    assert type(next(method.teacher.parameters())).__name__ == "DTensor"
    opt = _optimizer(method)  # after sharding: it holds the DTensor parameters
    norms = _train(method, opt, range(RESUME_AT), rows, sharded=True)
    ckpt = _checkpoint(method, opt)  # 2 processes -> full tensors
    norms += _train(method, opt, range(RESUME_AT, STEPS), rows, sharded=True)
    final = _checkpoint(method, opt)
    # 1 -> 2 processes: a fresh sharded method resumes from the 1-process checkpoint
    resumed = _method()
    shard_method(resumed)
    opt2 = _optimizer(resumed)
    _resume(resumed, opt2, one_process_ckpt)
    _train(resumed, opt2, range(RESUME_AT, STEPS), rows, sharded=True)
    from_one = _checkpoint(resumed, opt2)
    if rank == 0:
        torch.save({"ckpt": ckpt, "final": final, "from_one": from_one, "norms": norms}, out)
    dist.destroy_process_group()


LR = 1e-3  # the optimiser's (see _optimizer)


def _assert_same(got: dict, want: dict) -> None:
    a, b = got["model"], want["model"]
    assert a.keys() == b.keys()
    for k in a:
        if not isinstance(b[k], torch.Tensor):
            assert a[k] == b[k], k  # the method's step / epoch counters
        elif k.endswith("attn.qkv.bias"):
            # The key bias adds q.b_k to every logit of a query: softmax ignores it, its gradient is
            # zero up to rounding, and AdamW's normalisation turns that rounding (which differs with
            # the reduction order of one process or two, and with the CPU's kernels) into steps of
            # up to lr each. Queries and values are compared as closely as the rest; the key bias,
            # which changes no output, within those steps.
            d = a[k].numel() // 3
            for part in (slice(0, d), slice(2 * d, 3 * d)):
                torch.testing.assert_close(a[k][part], b[k][part], rtol=1e-4, atol=1e-6, msg=k)
            assert (a[k][d:2 * d] - b[k][d:2 * d]).abs().max() <= 1.01 * LR * STEPS, k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    sa, sb = got["optim"]["state"], want["optim"]["state"]
    assert sa.keys() == sb.keys() and sa
    for n in sb:
        for k in sb[n]:
            torch.testing.assert_close(sa[n][k], sb[n][k], rtol=1e-4, atol=1e-7, msg=f"{n} {k}")
    assert got["optim"]["param_groups"] == want["optim"]["param_groups"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_fsdp2_training_equals_one_process_and_resumes_at_the_other_world_size(tmp_path, monkeypatch, method):
    monkeypatch.setattr(sys.modules[__name__], "METHOD", method)
    # 1 process, full batch, unsharded: the reference, with its checkpoint after RESUME_AT steps
    ref = _method()
    opt = _optimizer(ref)
    everything = slice(0, GLOBAL_BATCH)
    ref_norms = _train(ref, opt, range(RESUME_AT), everything, sharded=False)
    one_ckpt = _checkpoint(ref, opt)
    ref_norms += _train(ref, opt, range(RESUME_AT, STEPS), everything, sharded=False)
    want = _checkpoint(ref, opt)
    assert want["model"]["_extra_state"]["step"] == STEPS
    if method == "dino":  # the centre moved (it is all-reduced over the processes)
        assert next(v for k, v in want["model"].items() if k.endswith("center")).abs().sum() > 0

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_worker, args=(f"file://{tmp_path}/pg", one_ckpt, str(tmp_path / "r")), nprocs=2,
                       start_method="fork")  # fork: the children need not import torch and timm again
    r = torch.load(tmp_path / "r", weights_only=True)

    for got, ref_n in zip(r["norms"], ref_norms, strict=True):  # the full gradients' norms
        torch.testing.assert_close(got, ref_n, rtol=1e-4, atol=1e-7)
    assert all((n > CLIP).any() for n in ref_norms)  # the clipping acted in every step
    _assert_same(r["final"], want)  # 2 processes sharded == 1 process
    _assert_same(r["from_one"], want)  # 1 -> 2 processes
    # 2 -> 1 process: the gathered checkpoint resumes unsharded
    resumed = _method()
    opt = _optimizer(resumed)
    _resume(resumed, opt, r["ckpt"])
    _train(resumed, opt, range(RESUME_AT, STEPS), everything, sharded=False)
    _assert_same(_checkpoint(resumed, opt), want)
    # the teacher is not the student (the EMA ran on the local shards)
    t = {k: v for k, v in want["model"].items() if k.startswith("teacher.")}
    assert any(not torch.equal(v, want["model"]["student." + k[len("teacher."):]]) for k, v in t.items())
