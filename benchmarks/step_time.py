"""DINO training-step time: dinokit against its peers, side by side in one run.

dinokit runs here (its venv); each peer runs ``peer_step.py`` in ``.bench-venv`` (made by
``benchmarks/setup_peers.sh``) with the same timm backbone, head sizes, crops and batch.
Measured: forward on all crops, backward, AdamW step, EMA teacher update.

    .venv/bin/python benchmarks/step_time.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_views, summary, time_steps

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / ".bench-venv" / "bin" / "python"


def dinokit_step(a: dict):
    import dinokit

    model = dinokit.DINO(a["model"], projector_hidden_dim=a["hidden"], projector_bottleneck_dim=a["bottleneck"],
                         n_prototypes=a["prototypes"], check_finite=False).to(a["device"])
    opt = torch.optim.AdamW(model.student_parameters(), lr=1e-4)
    glob, loc = make_views(a["batch"], a["n_global"], a["n_local"], a["gsize"], a["lsize"], a["device"])
    autocast = torch.autocast(a["device"], dtype=torch.bfloat16, enabled=a["precision"] == "bf16")

    def step():
        with autocast:
            out = model(global_views=glob, local_views=loc)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.update_teacher(0.996)

    return step


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-global", type=int, default=2)
    p.add_argument("--n-local", type=int, default=6)
    p.add_argument("--global-size", type=int, default=96)
    p.add_argument("--local-size", type=int, default=48)
    p.add_argument("--prototypes", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--bottleneck", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--peers", nargs="*", default=["lightly", "stable-pretraining"])
    args = p.parse_args()
    a = {"model": args.model, "batch": args.batch, "n_global": args.n_global, "n_local": args.n_local,
         "gsize": args.global_size, "lsize": args.local_size, "prototypes": args.prototypes,
         "hidden": args.hidden, "bottleneck": args.bottleneck, "steps": args.steps, "warmup": args.warmup,
         "threads": args.threads, "device": args.device, "precision": args.precision}
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results = {"dinokit": summary(time_steps(dinokit_step(a), a["steps"], a["warmup"], a["device"]), a["batch"])}
    for peer in args.peers:
        if not PEER_PY.exists():
            results[peer] = {"error": "no .bench-venv: run benchmarks/setup_peers.sh"}
            continue
        r = subprocess.run([str(PEER_PY), str(Path(__file__).parent / "peer_step.py"), peer, json.dumps(a)],
                           capture_output=True, text=True, cwd=Path(__file__).parent)
        try:
            results[peer] = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            results[peer] = {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    ours = results["dinokit"]["median_ms"]
    print(f"{'library':22s} {'ms/step':>9s} {'img/s':>8s} {'time vs dinokit':>16s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:22s} error: {r['error']}")
            continue
        print(f"{name:22s} {r['median_ms']:9.1f} {r['images_per_s']:8.1f} {r['median_ms'] / ours:15.2f}x")
    out = ROOT / "benchmarks" / "results" / f"step_time_{args.device}.json"
    out.write_text(json.dumps({"args": a, "results": results, "machine": {
        "cpu": cpu_name(), "cores": torch.get_num_threads(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "date": time.strftime("%Y-%m-%d")}}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
