"""Cross-process reductions, checked with 2 processes on gloo against one process on all data."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
