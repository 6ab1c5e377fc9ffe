"""lightly-train's distillation at ``benchmarks/distill.py``'s budget: its default ``distillation``
method, with the same teacher (dinokit's tiny DINOv3 ViT, exported as a timm folder and passed
as a module, which lightly-train wraps as a timm model), the same student (timm's resnet10t, one
input channel), the same images (a folder of the Fashion-MNIST training images), batch and step
count, and the same normalisation.

Runs in its own environment (lightly-train is AGPL: never a dinokit dependency)::

    .bench-venv-lightly-train/bin/python benchmarks/peer_distill.py --teacher T --data D --out O ...

Prints one JSON line: wall and process-CPU seconds of the training, its steps, and the path of the
trained student's state dict (scored by ``distill.py`` with dinokit's evaluation code).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightly_train
import timm
import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, required=True, help="timm export folder of the teacher")
    p.add_argument("--data", type=Path, required=True, help="folder of training images")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--mean", type=float, required=True)
    p.add_argument("--std", type=float, required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    teacher = timm.create_model(f"local-dir:{a.teacher.resolve()}", pretrained=True, num_classes=0)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=1)
    t0, c0 = time.perf_counter(), time.process_time()
    lightly_train.pretrain(
        out=str(a.out), data=str(a.data), model=student, method="distillation",
        method_args={"teacher": teacher}, batch_size=a.batch, num_workers=0, accelerator="cpu", devices=1,
        seed=a.seed, epochs=1000, precision="32-true", overwrite=True,
        trainer_args={"max_steps": a.steps},
        transform_args={"image_size": (a.size, a.size), "num_channels": 1,
                        "normalize": {"mean": (a.mean,), "std": (a.std,)}},
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    path = a.out / "student_state.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(student.state_dict(), tmp)
    os.replace(tmp, path)  # a killed run leaves no half-written state
    print(json.dumps({"train_wall_s": wall, "train_cpu_s": cpu, "steps": a.steps, "state": str(path),
                      "lightly_train": lightly_train.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
