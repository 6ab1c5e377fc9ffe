"""What a distillation checkpoint costs on disk with and without its frozen teacher.

A distillation's teacher is an input of the run, never trained: its checkpoints leave it out
(``distillation.checkpoint_teacher=false``, the default, as DINOv3's multi-distillation does) and
record a SHA-256 fingerprint of its weights, taken once when the run starts and checked on
resume. For teacher/student pairs users distil (the architectures of Meta's published DINOv2 and
DINOv3 ViTs, randomly initialised: nothing is downloaded), this writes the checkpoint a step of
``dinokit train`` writes (weights, AdamW's two moments of every student parameter, the run's
metadata) both ways and reports its size, the time to write it, and the time to fingerprint the
teacher.

    .venv/bin/python benchmarks/distill_checkpoint.py            # the BENCHMARKS.md table
    .venv/bin/python benchmarks/distill_checkpoint.py --pairs small   # the smallest pair only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_section

from dinokit import atomic
from dinokit.backbones import build_backbone
from dinokit.methods import Distillation
from dinokit.settings import BackboneSettings, MethodSettings, ModelSettings, OptimSettings
from dinokit.train.module import DINOModule
from dinokit.train.step import build_method_optimizer
from dinokit.weights import fingerprint

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "distill_checkpoint.json"
#: name -> (teacher, student): timm architectures, randomly initialised
PAIRS: dict[str, tuple[str, str]] = {
    "small": ("vit_small_patch14_dinov2", "resnet18"),
    "base": ("vit_base_patch14_dinov2", "resnet50"),
    "large": ("vit_large_patch16_dinov3", "vit_small_patch16_dinov3"),
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure(teacher_name: str, student_name: str, folder: Path) -> dict[str, Any]:
    teacher = timm.create_model(teacher_name, pretrained=False, num_classes=0)
    c0 = time.process_time()
    w0 = time.perf_counter()
    fp = fingerprint(teacher)
    fp_cpu, fp_wall = time.process_time() - c0, time.perf_counter() - w0
    out: dict[str, Any] = {"teacher": teacher_name, "student": student_name,
                           "teacher_params_m": n_params(teacher) / 1e6, "fingerprint_cpu_s": fp_cpu,
                           "fingerprint_wall_s": fp_wall, "fingerprint": fp[:12]}
    for keep in (False, True):
        s = MethodSettings()
        s = dataclasses.replace(s, backbone=BackboneSettings(name=student_name),
                                distillation=dataclasses.replace(s.distillation, checkpoint_teacher=keep),
                                model=ModelSettings(method="distill"))
        method = Distillation(nn.ModuleDict({"backbone": build_backbone(teacher)}), settings=s)
        out["student_params_m"] = sum(n_params(n) for n, _ in method.trained_networks().values()) / 1e6
        module = DINOModule(method)
        opt = build_method_optimizer(method, OptimSettings())
        for group in opt.param_groups:  # AdamW's state after a step: two moments per parameter
            for p in group["params"]:
                opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}
        ckpt = {"state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 1}
        module.on_save_checkpoint(ckpt)
        path = folder / f"{'with' if keep else 'without'}.ckpt"
        w0 = time.perf_counter()
        torch.save(ckpt, path)
        out[f"{'with' if keep else 'without'}_teacher_mb"] = path.stat().st_size / 2**20
        out[f"{'with' if keep else 'without'}_teacher_save_s"] = time.perf_counter() - w0
        path.unlink()
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| teacher | student | params (teacher / student) | checkpoint, teacher left out (default) | "
             "checkpoint with the teacher (`checkpoint_teacher=true`) | write time (out / in) | "
             "fingerprint at start (CPU s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| `{r['teacher']}` | `{r['student']}` | {r['teacher_params_m']:.0f} M / {r['student_params_m']:.0f} M | "
            f"{r['without_teacher_mb']:.0f} MB | {r['with_teacher_mb']:.0f} MB | "
            f"{r['without_teacher_save_s']:.2f} s / {r['with_teacher_save_s']:.2f} s | "
            f"{r['fingerprint_cpu_s']:.2f} |")
    lines += ["", f"Machine: {machine()}; torch {torch.__version__}, timm {timm.__version__}. Sizes are the files "
              "`torch.save` writes (fp32 weights; AdamW's two moments of every student parameter); times on "
              "this machine's disk and CPU, one run each."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dinokit-ckpt-", dir=args.out.parent) as tmp:
        for name in args.pairs:
            rows.append(measure(*PAIRS[name], Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    atomic.write_text(args.out, json.dumps({"machine": machine(), "rows": rows}, indent=1))
    write_section(args.md, "distill-checkpoint", "Distillation checkpoints without the teacher", markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
