"""What seeding each sample's crops costs: ``torch.manual_seed`` against the CPU generator alone.

Every sample's crops (and every batch's masks) are drawn under a seed of their own, so that they
do not depend on the process, the worker or the order. ``torch.manual_seed`` seeds every
accelerator's generator too; where CUDA is not initialised (a loader worker, a CPU machine) that
queues the seed with a formatted stack trace, whose cost grows with the depth of the stack it is
called from. :func:`dinokit.seeding.cpu_rng` seeds the CPU generator only, which is the one the
crops and masks are drawn from: the crops are bit-identical either way.

Two measures, the two seedings interleaved in each round, one thread:

1. one seeding at the depth of a training step's stack (``--depth`` frames);
2. ``dinokit train`` of a preset (``--preset``, ``--steps`` steps, ``data.num_workers=0`` so that
   the loader runs in the training process), in a fresh process per run: CPU seconds per step of
   the whole run (start-up included), with the old seeding patched in for the "before" runs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sample_seeding.py            # about 3 CPU-minutes
    .venv/bin/python benchmarks/sample_seeding.py --steps 5 --rounds 1         # a smoke run

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

from dinokit.seeding import cpu_rng

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, sys, time
import torch
import dinokit.data.streaming as S
import dinokit.train.loader as L
sys.path.insert(0, BENCHMARKS)
from sample_seeding import everywhere
if sys.argv[1] == "torch.manual_seed":
    L.cpu_rng = S.cpu_rng = everywhere
from dinokit.config import load_config
from dinokit.train.fit import fit
torch.set_num_threads(1)
cfg = load_config(sys.argv[2], sys.argv[4:])
c0 = time.process_time()
result = fit(cfg)
print(json.dumps({"cpu_s_per_step": (time.process_time() - c0) / int(sys.argv[3])}))
""".replace("BENCHMARKS", repr(str(Path(__file__).resolve().parent)))


@contextlib.contextmanager
def everywhere(seed: int) -> Iterator[None]:
    """The seeding before: the CPU generator forked, every generator seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def at_depth(depth: int, fn: Callable[[], float]) -> float:
    return at_depth(depth - 1, fn) if depth else fn()


def per_seeding_ms(seeding: Callable[[int], contextlib.AbstractContextManager], n: int) -> float:
    c0 = time.process_time()
    for i in range(n):
        with seeding(i):
            torch.rand(3)
    return (time.process_time() - c0) / n * 1e3


def run_preset(seeding: str, preset: str, steps: int, out: Path) -> float:
    over = ["data.num_workers=0", f"trainer.max_steps={steps}", "trainer.epochs=100", "trainer.progress=false",
            "trainer.knn_every_n_epochs=0", "trainer.accelerator=cpu", f"trainer.output_dir={out}",
            f"trainer.run_name={seeding.replace('.', '_')}-{time.monotonic_ns()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", RUN, seeding, preset, str(steps), *over], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["cpu_s_per_step"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--depth", type=int, default=60, help="stack frames above one seeding")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    seedings = {"torch.manual_seed": everywhere, "cpu_rng": cpu_rng}
    one: dict[str, list[float]] = {k: [] for k in seedings}
    runs: dict[str, list[float]] = {k: [] for k in seedings}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            for name, seeding in seedings.items():
                one[name].append(at_depth(a.depth, lambda s=seeding: per_seeding_ms(s, 2000)))
                runs[name].append(run_preset(name, a.preset, a.steps, Path(tmp)))
    base = statistics.median(runs["torch.manual_seed"])
    print(f"`benchmarks/sample_seeding.py --preset {a.preset} --steps {a.steps} --rounds {a.rounds} --depth "
          f"{a.depth}`; {machine()}, torch {torch.__version__}; medians of {a.rounds} interleaved rounds.\n")
    print(f"| seeding | one seeding, {a.depth} frames deep (CPU ms) | `dinokit train --config {a.preset}`, "
          f"{a.steps} steps (CPU s / step) | vs before |")
    print("|---|---:|---:|---:|")
    for name in seedings:
        cpu = statistics.median(runs[name])
        print(f"| `{name}` | {statistics.median(one[name]):.3f} | {cpu:.3f} | {base / cpu:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
