"""Shared by dinokit's and the peers' step benchmarks (plain torch + timm only, no dinokit import,
so the peer script can run in the peers' own virtual environment).

Each library runs in its own worker process that builds its step once and then answers requests
on stdin (``time N``: run N steps and print their wall and CPU times as one JSON line), so that the
driver (``step_time.py``) can interleave the libraries round-robin in one invocation.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: dense bf16 tensor-core peak (FLOP/s) by device name fragment, for the MFU figure.
BF16_PEAK = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 NVL": 835.5e12, "H100 PCIe": 756.5e12,
             "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def make_views(batch: int, n_global: int, n_local: int, gsize: int, lsize: int, device: str):
    g = torch.Generator().manual_seed(0)
    glob = [torch.randn(batch, 3, gsize, gsize, generator=g).to(device) for _ in range(n_global)]
    loc = [torch.randn(batch, 3, lsize, lsize, generator=g).to(device) for _ in range(n_local)]
    return glob, loc


def random_masks(rows: int, n_patches: int, ratio: float, device: str) -> torch.Tensor:
    """Exactly ``round(ratio * N)`` masked patches per row (what every library's DINOv2 draws)."""
    k = int(round(ratio * n_patches))
    order = torch.rand(rows, n_patches, device=device).argsort(dim=1)[:, :k]
    return torch.zeros(rows, n_patches, dtype=torch.bool, device=device).scatter_(1, order, True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], None], steps: int, device: str) -> tuple[list[float], list[float]]:
    """Wall and process-CPU milliseconds of each of ``steps`` calls of ``step``."""
    wall, cpu = [], []
    for _ in range(steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return wall, cpu


def time_block(step: Callable[[], None], steps: int, device: str) -> tuple[float, float]:
    """Wall and process-CPU milliseconds per step of ``steps`` back-to-back calls of ``step``: the
    device is synchronised before and after the block only, so the host runs ahead between steps
    as in a training loop (a step that waits for the device shows it; one that does not, does not)."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) * 1000 / steps, (time.process_time() - c0) * 1000 / steps


def reset_peak_memory(device: str) -> None:
    """Start a new CUDA peak (no-op on CPU, where the maximum RSS cannot be reset)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float:
    """Peak CUDA memory allocated, or this process's maximum resident set size on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call of ``step`` (forward and backward), by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def serve(build: Callable[[], Callable[[], None]], a: dict) -> None:
    """Worker loop: build the step, say ``ready``, then answer ``warmup N`` / ``time N`` (each
    step synchronised) / ``block N`` (N steps synchronised once, see :func:`time_block`) /
    ``flops`` / ``quit`` lines on stdin with one JSON line each on stdout. The peak memory of a
    ``time`` or ``block`` reply is that of its own steps (the CUDA peak is reset before them)."""
    torch.manual_seed(0)
    torch.set_num_threads(a["threads"])
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not break the protocol
    try:
        step = build()
    except Exception as e:
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"[:400]}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd, *rest = line.split()
        try:
            if cmd == "quit":
                break
            if cmd == "warmup":
                time_steps(step, int(rest[0]), a["device"])
                reply: dict = {"ok": True}
            elif cmd == "time":
                reset_peak_memory(a["device"])
                wall, cpu = time_steps(step, int(rest[0]), a["device"])
                reply = {"wall_ms": wall, "cpu_ms": cpu, "peak_mb": peak_memory_mb(a["device"])}
            elif cmd == "block":
                reset_peak_memory(a["device"])
                wall_ms, cpu_ms = time_block(step, int(rest[0]), a["device"])
                reply = {"wall_ms": [wall_ms], "cpu_ms": [cpu_ms], "peak_mb": peak_memory_mb(a["device"])}
            elif cmd == "flops":
                reply = {"flops": count_flops(step)}
            else:
                reply = {"error": f"unknown command {cmd!r}"}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"[:400]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def cpu_name() -> str:
    """The CPU's model name (for the machine line of a result)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The machine line of a result: the CPU's model name, the cores this process may use, the OS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_name()}, {cores} cores available, {platform.system()} {platform.release()}"


def demo_data(strict: bool, what: str) -> str:
    """Which images ``data.dataset=demo`` and the scenes read on this machine: ``"fashion-mnist"``,
    or ``"digits"`` (scikit-learn's) where Fashion-MNIST is not installed. ``strict``: a benchmark
    whose figures go beside BENCHMARKS.md's (all on Fashion-MNIST) stops with one line instead."""
    from dinokit.data.datasets import FASHION_MNIST_INSTALL, fashion_mnist_available

    if fashion_mnist_available():
        return "fashion-mnist"
    why = (f"Fashion-MNIST is not installed ({FASHION_MNIST_INSTALL}), so the demo data would be "
           "scikit-learn's digits")
    if strict:
        raise SystemExit(f"{what}: {why}, whose figures are not comparable with BENCHMARKS.md's")
    print(f"{what}: warning: {why}; these figures are on digits", file=sys.stderr, flush=True)
    return "digits"


def write_section(path: Path, key: str, heading: str, body: str) -> None:
    """Put ``body`` between the markers ``<!-- key:begin -->`` and ``<!-- key:end -->`` of ``path``
    (BENCHMARKS.md), everything around them kept; a file without them gains a ``## heading``
    section at its end. Written to a temporary name and renamed, so a killed run leaves the old file."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n{block}\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
