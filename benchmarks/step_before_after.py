"""The training step's CPU time in two source trees, interleaved: did a change make it slower?

Each tree (a git revision, extracted to a temporary folder, and the working tree) runs in its own
worker process that builds a method and the plain ``DINOTrainer`` once, then times whole epochs
of the same batches on request; the driver alternates the trees round by round, so both see the
same machine load. Reported per method: median milliseconds per step (wall and process CPU) and
the ratio after / before. The CPU config of issue 14: timm ViT-Tiny at 64 px, batch 8,
2 x 64 + 4 x 32 crops, 4096 prototypes, fp32.

    .venv/bin/python benchmarks/step_before_after.py --before f77eef2 --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, warnings
import torch
torch.set_num_threads(int(sys.argv[2]))
warnings.simplefilter("ignore")
from dinokit import DINO, DINOv2, build_backbone
from dinokit.data import MultiCropCollate
from dinokit.masking import make_mask_generator
from dinokit.train import DINOTrainer

name, steps = sys.argv[1], int(sys.argv[3])
torch.manual_seed(0)
backbone = build_backbone("vit_tiny_patch16_224", encoder_kwargs={"img_size": 64, "dynamic_img_size": True})
kw = dict(n_prototypes=4096, projector_hidden_dim=2048, projector_bottleneck_dim=256)
method = DINO(backbone, **kw) if name == "dino" else DINOv2(backbone, n_patch_prototypes=4096, **kw)
g = torch.Generator().manual_seed(0)
collate = (MultiCropCollate() if name == "dino"
           else MultiCropCollate(make_mask_generator("block", (4, 4)), patch_size=16, mask_probability=0.5))
items = lambda: [({"global_views": [torch.randn(3, 64, 64, generator=g) for _ in range(2)],
                   "local_views": [torch.randn(3, 32, 32, generator=g) for _ in range(4)]}, 0) for _ in range(8)]
batches = [collate(items()) for _ in range(steps)]
try:  # the settings objects (this tree); older trees took the step's keywords directly
    from dinokit.settings import OptimSettings
    from dinokit.train.step import StepSettings

    settings = StepSettings(optim=OptimSettings(freeze_last_layer_epochs=0))
    trainer = DINOTrainer(method, batches, settings=settings, epochs=10_000, device="cpu")
except ImportError:
    trainer = DINOTrainer(method, batches, epochs=10_000, device="cpu", freeze_last_layer_epochs=0)
trainer.train_epoch()  # warm-up
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "time":
        break
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train_epoch()
    print(json.dumps({"wall": (time.perf_counter() - t0) * 1000 / steps,
                      "cpu": (time.process_time() - c0) * 1000 / steps}), flush=True)
"""


def extract(rev: str, dest: Path) -> Path:
    """``src/`` of git revision ``rev`` under ``dest``."""
    archive = dest / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def start(src: Path, method: str, threads: int, steps: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, method, str(threads), str(steps)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if line != "ready":
        raise RuntimeError(f"worker for {src} failed to start: {line!r}")
    return proc


def ask(proc: subprocess.Popen) -> dict:
    proc.stdin.write("time\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    return json.loads(proc.stdout.readline())  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision to compare against (e.g. f77eef2)")
    ap.add_argument("--methods", nargs="+", default=["dino", "dinov2"], choices=["dino", "dinov2"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=6, help="steps per timed epoch")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_before_after.json")
    a = ap.parse_args()
    results: dict = {"before": a.before, "threads": a.threads, "rounds": a.rounds, "steps": a.steps,
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": extract(a.before, Path(tmp)), "after": ROOT / "src"}
        for method in a.methods:
            procs = {k: start(src, method, a.threads, a.steps) for k, src in trees.items()}
            times: dict[str, list[dict]] = {k: [] for k in procs}
            for r in range(a.rounds):
                order = list(procs) if r % 2 == 0 else list(reversed(procs))  # alternate who goes first
                for k in order:
                    times[k].append(ask(procs[k]))
            for p in procs.values():
                p.stdin.close()  # type: ignore[union-attr]
                p.wait()
            med = {k: {m: statistics.median(t[m] for t in v) for m in ("wall", "cpu")} for k, v in times.items()}
            results["methods"][method] = {**med, "ratio_wall": med["after"]["wall"] / med["before"]["wall"],
                                          "ratio_cpu": med["after"]["cpu"] / med["before"]["cpu"]}
            m = results["methods"][method]
            print(f"{method}: before {med['before']['wall']:.1f} ms (cpu {med['before']['cpu']:.1f}), "
                  f"after {med['after']['wall']:.1f} ms (cpu {med['after']['cpu']:.1f}); after/before "
                  f"wall {m['ratio_wall']:.3f}, cpu {m['ratio_cpu']:.3f}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
