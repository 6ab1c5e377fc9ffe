"""CPU embedding throughput: the torch backbone vs its ONNX export run by onnxruntime, on the same
normalised batches, interleaved round by round (torch, onnxruntime, torch, ...) so that load from
other processes falls on both alike. Reports images/s by wall clock and by process CPU time, and the
onnxruntime / torch ratios (medians over rounds).

``.venv/bin/python benchmarks/onnx_embed.py [--model vit_small_patch16_224] [--size 224] [--batch 8]
[--rounds 5] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dinokit.backbones import build_backbone
from dinokit.interop.onnx import OnnxFeatures, export_onnx


def timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bb = build_backbone(a.model).eval()
    pre = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": 3, "input_size": a.size}
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(bb, Path(d) / "bb.onnx", preprocessing=pre)
        runner = OnnxFeatures(path, threads=a.threads)
        x = torch.randn(a.batch, 3, a.size, a.size)
        xn = x.numpy()
        with torch.inference_mode():
            ref = bb(x).cls.numpy()
        diff = float(np.abs(runner.features(xn)["cls"] - ref).max())

        def run_torch() -> None:
            with torch.inference_mode():
                bb(x)

        def run_ort() -> None:
            runner.features(xn)

        run_torch(), run_ort()  # warm-up
        rows = {"torch": [], "onnxruntime": []}
        for _ in range(a.rounds):
            rows["torch"].append(timed(run_torch))
            rows["onnxruntime"].append(timed(run_ort))
    print(f"{a.model} at {a.size} px, batch {a.batch}, {a.threads} thread(s), {a.rounds} interleaved rounds; "
          f"max abs diff of cls {diff:.1e}")
    med = {}
    for name, r in rows.items():
        wall, cpu = statistics.median(t[0] for t in r), statistics.median(t[1] for t in r)
        med[name] = (wall, cpu)
        print(f"  {name:12s} {a.batch / wall:7.2f} img/s wall   {a.batch / cpu:7.2f} img/s per CPU-second")
    print(f"  onnxruntime / torch: wall time x{med['onnxruntime'][0] / med['torch'][0]:.2f}, "
          f"CPU time x{med['onnxruntime'][1] / med['torch'][1]:.2f} (below 1: onnxruntime faster)")


if __name__ == "__main__":
    main()
