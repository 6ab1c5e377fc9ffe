"""Cross-process reductions, checked with 2 processes on gloo against one process on all data."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import settings, tiny_cnn
from dinokit.distributed import all_gather_cat
from dinokit.losses import EMACenter, koleo_loss, sinkhorn_knopp


def _worker(rank: int, init: str, data: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    half = slice(rank * 4, rank * 4 + 4)
    results = {"sk": sinkhorn_knopp(data["logits"][half], 0.1, 3)}
    center = EMACenter(5, 0.9)
    center.update(data["logits"][half])
    results["center"] = center.center
    x = data["x"][half].clone().requires_grad_()
    results["koleo"] = koleo_loss(x, all_processes=True).detach()
    g = all_gather_cat(x)
    g.sum().backward()
    results["gathered"] = g.detach()
    results["grad"] = x.grad
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = {"logits": torch.randn(8, 5, generator=gen), "x": torch.randn(8, 3, generator=gen)}
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(f"file://{tmp_path}/pg", data, str(tmp_path / "r")), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r.{i}", weights_only=True) for i in range(2)]
    full = sinkhorn_knopp(data["logits"], 0.1, 3)
    torch.testing.assert_close(torch.cat([r[0]["sk"], r[1]["sk"]]), full)
    one = EMACenter(5, 0.9)
    one.update(data["logits"])
    torch.testing.assert_close(r[0]["center"], one.center)
    torch.testing.assert_close(r[1]["center"], one.center)
    torch.testing.assert_close((r[0]["koleo"] + r[1]["koleo"]) / 2, koleo_loss(data["x"]))
    torch.testing.assert_close(r[0]["gathered"], data["x"])
    torch.testing.assert_close(r[1]["grad"], torch.ones(4, 3))  # only the local slice gets gradient


# ------------------------------------------------------------------ FSDP2 (fully_shard on CPU, gloo)
def _tiny_dino():
    from dinokit import DINO, build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch16_224", encoder_kwargs=dict(
        img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2))
    return DINO(backbone, projector_hidden_dim=32, projector_bottleneck_dim=16, n_prototypes=16)


def _student_loss(method, x):
    return method.student_head(method.student_backbone(x).cls).pow(2).mean()


def _fsdp_worker(rank: int, init: str, x: torch.Tensor, out: str) -> None:
    from dinokit.train.strategy import (
        clip_per_parameter_sharded_,
        full_state_dict,
        load_full_state_dict,
        shard_method,
    )

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    method = _tiny_dino()
    with torch.no_grad():  # the student moved away from the teacher (as after optimiser steps)
        g = torch.Generator().manual_seed(1)
        for p in method.student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    shard_method(method)
    assert type(next(method.teacher.parameters())).__name__ == "DTensor"
    _student_loss(method, x[rank * 2:rank * 2 + 2]).backward()  # FSDP averages over the 2 ranks
    norms = clip_per_parameter_sharded_(list(method.student.parameters()), 0.05)
    grads = {n: p.grad.full_tensor() for n, p in method.student.named_parameters() if p.grad is not None}
    method._ema(0.9)
    method._ema(0.5, torch.tensor(False))  # skipped on the device
    method._ema(0.8, torch.tensor(True))
    teacher = full_state_dict(method.teacher)
    load_full_state_dict(method.teacher, full_state_dict(method.student))  # resharded load
    reloaded = full_state_dict(method.teacher)
    if rank == 0:
        torch.save({"teacher": teacher, "grads": grads, "norms": norms, "reloaded": reloaded}, out)
    dist.destroy_process_group()


def test_fsdp2_ema_and_clipping_on_local_shards_equal_the_unsharded_ones(tmp_path):
    """fully_shard runs on CPU with gloo in this torch: student and teacher sharded on one mesh,
    the EMA on local shards and DINO's clipping from sharded gradients equal the unsharded ones."""
    from dinokit.train.optim import clip_per_parameter_

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_fsdp_worker, args=(f"file://{tmp_path}/pg", x, str(tmp_path / "r")), nprocs=2,
                       start_method="fork")  # fork: the children need not import torch and timm again
    r = torch.load(tmp_path / "r", weights_only=True)

    ref = _tiny_dino()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in ref.student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    _student_loss(ref, x).backward()
    params = [p for p in ref.student.parameters() if p.grad is not None]
    raw = torch.stack([p.grad.norm() for p in params])
    clip_per_parameter_(params, 0.05)
    torch.testing.assert_close(r["norms"], raw, rtol=1e-4, atol=1e-7)
    assert (raw > 0.05).any()  # the clipping did act
    for n, p in ref.student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(r["grads"][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    s, t = ref.student.state_dict(), ref.teacher.state_dict()
    for k, v in t.items():
        if v.is_floating_point() and k in dict(ref.teacher.named_parameters()):
            expected = (v * 0.9 + s[k] * 0.1) * 0.8 + s[k] * 0.2  # t <- m t + (1 - m) s, twice
            torch.testing.assert_close(r["teacher"][k], expected, msg=k)
            torch.testing.assert_close(r["reloaded"][k], s[k], msg=k)


# ---------------------------------------------------------------------------------- SyncBatchNorm
def test_sync_batchnorm_converts_student_and_teacher_keeping_the_ema_pairing():
    from dinokit import DINO
    from dinokit.backbones import build_backbone
    from dinokit.train.strategy import convert_sync_batchnorm, has_batchnorm, prepare_for_strategy

    torch.manual_seed(0)
    method = DINO(build_backbone(tiny_cnn()), projector_hidden_dim=16, projector_bottleneck_dim=8,
                  n_prototypes=8, settings=settings(heads={"batch_norm": True}))
    ids = [id(p) for p in method.student.parameters()]

    class _Trainer:  # what prepare_for_strategy reads from a Lightning Trainer
        def __init__(self, world, accelerator):
            self.world_size, self.accelerator = world, type(accelerator, (), {})()

    assert not prepare_for_strategy(method, _Trainer(1, "CUDAAccelerator"))
    assert not prepare_for_strategy(method, _Trainer(2, "CUDAAccelerator"), sync_batchnorm=False)
    with pytest.warns(UserWarning, match="SyncBatchNorm needs GPUs"):
        assert not prepare_for_strategy(method, _Trainer(2, "CPUAccelerator"))
    assert prepare_for_strategy(method, _Trainer(2, "CUDAAccelerator"))
    for net in (method.student, method.teacher):
        bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert len(bns) == 3 and all(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)  # backbone + head
    assert [id(p) for p in method.student.parameters()] == ids  # the optimiser's tensors are kept
    assert has_batchnorm(method) and convert_sync_batchnorm(method) == 0  # idempotent
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in method.teacher.parameters()]
    method._ema(0.5)  # still paired by name
    assert all(not torch.equal(a, p) for a, p in zip(t0, method.teacher.parameters()))


# ----------------------------------------------------------------- per-rank randomness in the loader
def _draw(items):
    """A collate whose randomness stands for DINOv2's masks."""
    return torch.stack([x for x, _ in items]), torch.rand(2)


def _mask_draws(rank, monkeypatch, workers=0, seed=0):
    import dinokit.train.loader as loader

    monkeypatch.setattr(loader, "rank_world", lambda: (rank, 2))
    ds = loader.SeededViews(list(torch.arange(16.0)), lambda x: x + torch.rand(()), seed=seed)
    torch.manual_seed(0)  # every process starts from the same global RNG (pl.seed_everything)
    dl = loader.ResumableDataLoader(ds, batch_size=2, seed=seed, collate_fn=_draw, num_workers=workers)
    return list(dl)


def test_each_rank_draws_its_own_masks_reproducibly_whatever_the_worker_count(monkeypatch):
    r0, r1 = _mask_draws(0, monkeypatch), _mask_draws(1, monkeypatch)
    assert not any(torch.equal(a[1], b[1]) for a, b in zip(r0, r1))  # masks differ across ranks
    again = _mask_draws(0, monkeypatch, workers=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(r0, again))
    torch.manual_seed(0)
    before = torch.rand(1)
    _mask_draws(0, monkeypatch)
    assert torch.equal(torch.rand(1), before)  # the training RNG is left alone (seeded to 0 inside)
    # exact resume: a loader restored after 3 batches draws the masks of the uninterrupted one
    import dinokit.train.loader as loader

    ds = loader.SeededViews(list(torch.arange(16.0)), lambda x: x + torch.rand(()), seed=0)
    dl = loader.ResumableDataLoader(ds, batch_size=2, seed=0, collate_fn=_draw)
    it = iter(dl)
    [next(it) for _ in range(3)]
    resumed = loader.ResumableDataLoader(ds, batch_size=2, seed=0, collate_fn=_draw)
    resumed.load_state_dict(dl.state_dict())
    assert all(torch.equal(a[1], b[1]) for a, b in zip(r0[3:], resumed, strict=True))


# ------------------------------------------------------------------------- launcher environment
def test_dinokit_train_takes_the_world_from_torchrun_and_srun():
    from dinokit.config import load_config
    from dinokit.train.strategy import launcher_world, with_launcher_env

    cfg = load_config("demo", ["trainer.devices=auto"])
    torchrun = {"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}
    srun = {"SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8(x2)",
            "SLURM_JOB_NAME": "dinokit"}
    assert launcher_world(torchrun) == (4, 2) and launcher_world(srun) == (8, 2)
    assert launcher_world({}) is None and launcher_world({**srun, "SLURM_JOB_NAME": "bash"}) is None
    t = with_launcher_env(cfg, torchrun).trainer
    assert (t.devices, t.num_nodes) == ("4", 2)
    t = with_launcher_env(cfg, srun).trainer
    assert (t.devices, t.num_nodes) == ("8", 2)
    assert with_launcher_env(cfg, {}) is cfg
    explicit = load_config("demo", ["trainer.devices=2", "trainer.num_nodes=3"])
    assert with_launcher_env(explicit, torchrun) is explicit  # explicit values are Lightning's to check
