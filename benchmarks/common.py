"""Shared by dinokit's and the peers' step benchmarks (plain torch + timm only, no dinokit import,
so the peer script can run in the peers' own virtual environment)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def make_views(batch: int, n_global: int, n_local: int, gsize: int, lsize: int, device: str):
    g = torch.Generator().manual_seed(0)
    glob = [torch.randn(batch, 3, gsize, gsize, generator=g).to(device) for _ in range(n_global)]
    loc = [torch.randn(batch, 3, lsize, lsize, generator=g).to(device) for _ in range(n_local)]
    return glob, loc


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: str) -> list[float]:
    """Milliseconds per call of ``step`` (synchronising CUDA around each timed step)."""
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def summary(times: list[float], batch: int) -> dict[str, float]:
    med = statistics.median(times)
    return {"median_ms": med, "min_ms": min(times), "images_per_s": batch / (med / 1000)}
