"""Stochastic depth: DINOv2/v3's subset form against timm's per-sample ``DropPath``.

Forward + backward of one ViT student (every block at the same drop rate, as DINOv2/v3), the two
forms interleaved round by round on the same model and inputs, so that machine load drifts over
both alike. Prints one markdown row: median process-CPU time (CPU) or wall time (CUDA) per step
of each form and their ratio (subset / sample).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stochastic_depth.py            # ViT-S/16, 224 px, CPU
    .venv/bin/python benchmarks/stochastic_depth.py --device cuda --batch 64 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dinokit.backbones import build_backbone
from dinokit.backbones.stochastic_depth import set_uniform_drop_path, subset_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--rate", type=float, default=0.4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    bb = build_backbone(a.model, encoder_kwargs=dict(drop_path_rate=a.rate)).to(dev).train()
    set_uniform_drop_path(bb.model.blocks, a.rate)
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev)
    cuda = dev.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time

    def step(mode: str) -> float:
        bb.drop_path_mode = mode
        bb.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        out = bb(x)
        (out.cls.square().mean() + out.patches.square().mean()).backward()
        if cuda:
            torch.cuda.synchronize()
        return clock() - t0

    times: dict[str, list[float]] = {"sample": [], "subset": []}
    for mode in times:  # warm-up
        step(mode)
    for r in range(a.rounds):
        for mode in (("sample", "subset") if r % 2 == 0 else ("subset", "sample")):
            times[mode].append(step(mode))
    med = {m: statistics.median(t) for m, t in times.items()}
    ratios = [s / p for s, p in zip(times["subset"], times["sample"])]
    kind = "wall" if cuda else f"CPU, {a.threads} thread{'s' if a.threads > 1 else ''}"
    k = subset_size(a.batch, a.rate)
    print("| model | input | batch (kept) | rate | device | sample s/step | subset s/step | subset / sample |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {a.model} | {a.size} px | {a.batch} ({k}) | {a.rate} | {a.device} ({kind}) | {med['sample']:.3f} | "
          f"{med['subset']:.3f} | {statistics.median(ratios):.2f} (per-round {min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
