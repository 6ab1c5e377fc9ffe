"""Training-step time: dinokit against its peers, interleaved round-robin in one invocation.

Every library (and every dinokit variant) runs in its own worker process, built once: dinokit in
its venv (``.venv``), each peer in its own ``.bench-venv-<lib>`` (``benchmarks/setup_peers.sh``) through
``peer_step.py``. The driver then asks each worker in turn, round after round (the order rotating),
for a few timed steps, so machine load drifts over every library alike. A step is: the teacher on
the global crops, the student on every crop, the loss, backward, the optimiser step (each
library's own AdamW default; dinokit's ``build_optimizer``: fused where torch has the kernels) and
the EMA teacher update. Reported per worker: median wall and process-CPU time per step (CPU time
above wall x threads shows waiting, below shows other processes taking the cores), peak memory,
and the ratio of each peer's step time to dinokit's, the median over rounds of the per-round
ratio. ``--mfu`` adds model FLOPs utilisation: FLOPs of one step counted by
``torch.utils.flop_counter.FlopCounterMode`` over the median step time and the device's dense
bf16 peak (``--peak-tflops`` to override).

    .venv/bin/python benchmarks/step_time.py --config cpu --threads 1 2 --write-md
    .venv/bin/python benchmarks/step_time.py --config gpu --mfu --write-md   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import BF16_PEAK, cpu_name, make_views, median, serve, write_section

ROOT = Path(__file__).resolve().parents[1]
#: each peer library's own venv (``benchmarks/setup_peers.sh``)
PEER_VENV = {"stable-pretraining": "spt", "lightly": "lightly", "lightly-example": "lightly", "nidl": "nidl"}


def peer_python(peer: str) -> Path:
    return ROOT / f".bench-venv-{PEER_VENV[peer]}" / "bin" / "python"

MD = ROOT / "BENCHMARKS.md"

#: the issue's configurations: the CPU one (measured here), the GPU one (ViT-S/16 recipe crops).
CONFIGS = {
    "cpu": dict(model="vit_tiny_patch16_224", batch=8, n_global=2, n_local=4, global_size=64, local_size=32,
                prototypes=4096, hidden=2048, bottleneck=256, device="cpu", precision="fp32"),
    "gpu": dict(model="vit_small_patch16_224", batch=64, n_global=2, n_local=10, global_size=224,
                local_size=96, prototypes=65536, hidden=2048, bottleneck=256, device="cuda", precision="bf16"),
    # CNN backbones (DINO's ResNet recipe): channels-last against the contiguous layout
    "cnn-cpu": dict(model="resnet18", batch=16, n_global=2, n_local=4, global_size=96, local_size=48,
                    prototypes=4096, hidden=2048, bottleneck=256, device="cpu", precision="fp32"),
    "cnn-gpu": dict(model="resnet50", batch=64, n_global=2, n_local=10, global_size=224, local_size=96,
                    prototypes=65536, hidden=2048, bottleneck=256, device="cuda", precision="bf16"),
}
#: dinokit variants: label suffix -> (packed_crops, compile, channels_last, CLS-only last block)
VARIANTS = {"": ("auto", False, True, True), "packed": (True, False, True, True),
            "unpacked": (False, False, True, True), "compile": ("auto", True, True, True),
            "contiguous": ("auto", False, False, True), "full_tokens": ("auto", False, True, False)}
PEERS = {"dino": ["stable-pretraining", "lightly", "nidl", "lightly-example"],
         "dinov2": ["stable-pretraining", "lightly"], "dinov3": ["stable-pretraining", "lightly"]}


# ---------------------------------------------------------------------------------------- dinokit
def _sees_every_token(module, args, output):
    """A forward hook that changes nothing: on a ViT's final norm it makes ``cls_only`` calls run
    the full last block (the ``full_tokens`` variant)."""


def dinokit_method(method: str, a: dict, variant: str = ""):
    """dinokit's DINO / DINOv2 / DINOv3 at the benchmark's sizes (``a``) on ``a["device"]``, with
    ``variant``'s switches (see :data:`VARIANTS`; not ``compile``, which the caller applies)."""
    import dinokit
    from dinokit.backbones.generic import use_channels_last
    from dinokit.settings import BackboneSettings, DinoSettings, HeadSettings, IBOTSettings, MethodSettings

    packed, _, channels_last, prune = VARIANTS[variant]
    vit = "vit" in a["model"]
    backbone = BackboneSettings(name=a["model"], kwargs={"img_size": a["gsize"]} if vit else {},
                                channels_last=False)
    settings = MethodSettings(backbone=backbone, heads=HeadSettings(hidden_dim=a["hidden"], bottleneck_dim=a["bottleneck"]),
                              dino=DinoSettings(n_prototypes=a["prototypes"]),
                              ibot=IBOTSettings(n_prototypes=a["prototypes"]))
    cls = {"dino": dinokit.DINO, "dinov2": dinokit.DINOv2, "dinov3": dinokit.DINOv3}[method]
    model = cls(settings=settings).to(a["device"])
    model.check_finite = False
    model.student_backbone.packed_crops = packed
    for bb in (model.student_backbone, model.teacher_backbone):  # ViTs: CLS-only last block (DINO)
        if not prune and hasattr(bb, "supports_cls_only"):  # a hook on the final norm needs every token
            bb.model.norm.register_forward_hook(_sees_every_token)
    if channels_last:
        use_channels_last(model)
    return model


def dinokit_step(method: str, variant: str, a: dict):
    from dinokit.train.optim import build_optimizer

    compiled = VARIANTS[variant][1]
    model = dinokit_method(method, a, variant)
    opt = build_optimizer("adamw", [{"params": model.student_parameters(), "lr": 1e-4, "weight_decay": 0.04}])
    glob, loc = make_views(a["batch"], a["n_global"], a["n_local"], a["gsize"], a["lsize"], a["device"])
    autocast = torch.autocast(a["device"], dtype=torch.bfloat16, enabled=a["precision"] == "bf16")
    if compiled:  # what trainer.compile=true does: the step's tensor work, per-step scalars as inputs
        model.compile()
    fwd = model

    def step():
        with autocast:
            out = fwd(global_views=glob, local_views=loc)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.update_teacher(0.996)

    return step


# ---------------------------------------------------------------------------------------- driver
class Worker:
    """One library's step in its own process (see ``common.serve``)."""

    def __init__(self, label: str, cmd: list[str]):
        self.label = label
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=Path(__file__).parent)
        # drained all along: a chatty library must not fill the pipe and stall the worker
        self.stderr_lines: deque[str] = deque(maxlen=200)
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self.error: str | None = None
        self.rounds: list[dict] = []
        self.flops: float | None = None

    def ask(self, line: str | None) -> dict:
        if self.error:
            return {"error": self.error}
        try:
            if line is not None:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            r = json.loads(reply) if reply else {"error": self._stderr_tail()}
        except (BrokenPipeError, json.JSONDecodeError, OSError):
            r = {"error": self._stderr_tail()}
        if "error" in r:
            self.error = r["error"]
        return r

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    def _stderr_tail(self) -> str:
        self.proc.kill()
        self.proc.wait()
        self._drain.join(timeout=5)
        lines = [ln for ln in self.stderr_lines if ln.strip()]
        return (lines or ["worker died"])[-1][:400]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def run_group(method: str, threads: int, a: dict, args) -> dict:
    """Interleaved rounds over dinokit's variants and the peers for one method and thread count."""
    a = {**a, "threads": threads}
    workers = []
    for v in args.variants:
        label = "dinokit" + (f"[{v}]" if v else "")
        workers.append(Worker(label, [sys.executable, __file__, "--worker", method, v, json.dumps(a)]))
    for peer in args.peers:
        if peer not in PEERS[method]:
            continue
        python = peer_python(peer)
        if not python.exists():
            print(f"  {peer}: no .bench-venv-{PEER_VENV[peer]} (run benchmarks/setup_peers.sh)")
            continue
        workers.append(Worker(peer, [str(python), str(Path(__file__).parent / "peer_step.py"), peer, method,
                                     json.dumps(a)]))
    if args.sequential:  # one worker at a time (GPU memory): each is built, timed and closed in turn
        for w in workers:
            _time(w, args, args.rounds)
            w.close()
        return summarise(workers, threads, a, args)
    for w in workers:
        _time(w, args, 0)
    for r in range(args.rounds):
        order = workers[r % len(workers):] + workers[: r % len(workers)]
        for w in order:
            _time(w, args, 1, ready=False)
    for w in workers:
        if args.mfu and "compile" not in w.label:
            w.flops = w.ask("flops").get("flops")
        w.close()
    return summarise(workers, threads, a, args)


def _time(w: Worker, args, rounds: int, ready: bool = True) -> None:
    """Wait for the worker and warm it up (``ready``), then time ``rounds`` rounds."""
    if ready:
        w.ask(None)  # "ready" or an error
        w.ask(f"warmup {args.warmup}")
    for _ in range(rounds):
        rep = w.ask(f"time {args.steps}")
        if "wall_ms" in rep:
            w.rounds.append(rep)
    if rounds and args.mfu and "compile" not in w.label:
        w.flops = w.ask("flops").get("flops")


def summarise(workers: list[Worker], threads: int, a: dict, args) -> dict:
    ref = next((w for w in workers if w.label == "dinokit" and not w.error), None)
    out: dict = {}
    ref_flops = next((w.flops for w in workers if w.label.startswith("dinokit") and w.flops), None)
    for w in workers:
        if w.error or not w.rounds:
            out[w.label] = {"error": w.error or "no timed rounds"}
            continue
        wall = [t for r in w.rounds for t in r["wall_ms"]]
        cpu = [t for r in w.rounds for t in r["cpu_ms"]]
        row = {"median_ms": median(wall), "median_cpu_ms": median(cpu), "min_ms": min(wall),
               "images_per_s": a["batch"] / (median(wall) / 1000), "peak_mb": max(r["peak_mb"] for r in w.rounds),
               "steps": len(wall)}
        if ref is not None and len(ref.rounds) == len(w.rounds):
            ratios = [median(x["wall_ms"]) / median(y["wall_ms"]) for x, y in zip(w.rounds, ref.rounds)]
            cpu_ratios = [median(x["cpu_ms"]) / median(y["cpu_ms"]) for x, y in zip(w.rounds, ref.rounds)]
            row["time_vs_dinokit"] = median(ratios)
            row["cpu_time_vs_dinokit"] = median(cpu_ratios)
        flops = w.flops or (ref_flops if w.label.startswith("dinokit") else None)
        if flops:
            row["gflop_per_step"] = flops / 1e9
            row["tflop_s"] = flops / (row["median_ms"] / 1000) / 1e12
            if args.peak_tflops:
                row["mfu"] = row["tflop_s"] / args.peak_tflops
        out[w.label] = row
    return out


def device_peak_tflops(device: str) -> float | None:
    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in BF16_PEAK.items():
        if key in name:
            return peak / 1e12
    return None


def versions() -> dict[str, str]:
    import timm

    import dinokit

    out = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "dinokit": getattr(dinokit, "__version__", "?")}
    for venv in sorted(set(PEER_VENV.values())):
        python = ROOT / f".bench-venv-{venv}" / "bin" / "python"
        if not python.exists():
            continue
        r = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
        try:
            for p in json.loads(r.stdout):
                if p["name"].lower() in ("lightly", "stable-pretraining", "nidl"):
                    out[p["name"].lower()] = p["version"]
        except json.JSONDecodeError:
            pass
    return out


def markdown(res: dict) -> str:
    a, m, v = res["args"], res["machine"], res["versions"]
    peers = ", ".join(f"{k} {v[k]}" for k in ("stable-pretraining", "lightly", "nidl") if k in v)
    lines = [
        f"{m['date']}; {m['cpu'] if a['device'] == 'cpu' else m['gpu']} ({m['cores']} cores visible); "
        f"torch {v['torch']}, timm {v['timm']}, dinokit {v['dinokit']}; {peers}. Command: `{res['command']}`. "
        f"{a['model']}, batch {a['batch']}, {a['n_global']} x {a['gsize']} + {a['n_local']} x {a['lsize']} crops, "
        f"{a['prototypes']} prototypes per head (CLS, and patch for DINOv2/v3), head {a['hidden']}/{a['bottleneck']}, "
        f"{a['precision']}; {res['rounds']} {res.get('mode', 'interleaved')} rounds of {res['steps']} steps after "
        f"{res['warmup']} warm-up steps. Ratio = peer time / dinokit time (median of per-round ratios; "
        "> 1: dinokit is faster).",
        "",
    ]
    flops = any("gflop_per_step" in r for bt in res["results"].values() for rows in bt.values()
                for r in rows.values())
    lines += ["| method | threads | library | ms / step (wall) | CPU ms / step | time vs dinokit (wall / CPU) "
              "| peak MB |" + (" GFLOP / step | TFLOP/s | MFU |" if flops else ""),
              "| --- | ---: | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if flops else "")]
    for method, by_threads in res["results"].items():
        for threads, rows in by_threads.items():
            for lib, r in rows.items():
                if "error" in r:
                    lines.append(f"| {method} | {threads} | {lib} | error: {r['error'][:120]} | | | |"
                                 + (" | | |" if flops else ""))
                    continue
                ratio = (f"{r['time_vs_dinokit']:.2f}x / {r['cpu_time_vs_dinokit']:.2f}x"
                         if "time_vs_dinokit" in r else "")
                extra = ""
                if flops:
                    extra = (f" {r['gflop_per_step']:.1f} | {r['tflop_s']:.3f} |" if "gflop_per_step" in r
                             else " | |") + (f" {100 * r['mfu']:.1f} % |" if "mfu" in r else " |")
                lines.append(f"| {method} | {threads} | {lib} | {r['median_ms']:.1f} | {r['median_cpu_ms']:.1f} | "
                             f"{ratio} | {r['peak_mb']:.0f} |{extra}")
    return "\n".join(lines)





def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, variant, a = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        serve(lambda: dinokit_step(method, variant, a), a)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu",
                   help="cpu: ViT-Tiny 64 px, batch 8, 2x64+4x32, 4096 prototypes, fp32; "
                        "gpu: ViT-S/16, batch 64, 2x224+10x96, 65536 prototypes, bf16; "
                        "cnn-cpu: ResNet-18, batch 16, 2x96+4x48, fp32; cnn-gpu: ResNet-50 on the gpu crops")
    for k in ("model", "device"):
        p.add_argument(f"--{k}", help=f"override the config's {k}")
    for k in ("batch", "n-global", "n-local", "global-size", "local-size", "prototypes", "hidden", "bottleneck"):
        p.add_argument(f"--{k}", type=int, help=f"override the config's {k.replace('-', '_')}")
    p.add_argument("--precision", choices=("fp32", "bf16"))
    p.add_argument("--methods", nargs="+", choices=("dino", "dinov2", "dinov3"), default=["dino", "dinov2", "dinov3"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads per worker (CPU)")
    p.add_argument("--variants", nargs="*", choices=[v for v in VARIANTS if v], default=[],
                   help="dinokit variants beside the default: packed, unpacked (backbone.packed_crops), "
                        "compile (torch.compile of the method), contiguous (backbone.channels_last=false: "
                        "CNN weights and inputs in the default layout), full_tokens ("
                        "DINO's ViT last block on every token, not the CLS rows only)")
    p.add_argument("--peers", nargs="*", default=["stable-pretraining", "lightly", "nidl"],
                   help="stable-pretraining, lightly, nidl, lightly-example (one backbone call per crop)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per worker and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sequential", action="store_true",
                   help="one worker alive at a time (default on CUDA, where idle workers would hold memory); "
                        "not interleaved")
    p.add_argument("--mfu", action="store_true", help="count FLOPs (FlopCounterMode) and report MFU")
    p.add_argument("--peak-tflops", type=float, help="device bf16 peak for MFU (default: known GPUs)")
    p.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/step_time_<config>.json)")
    p.add_argument("--write-md", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args()
    cfg = dict(CONFIGS[args.config])
    for k in cfg:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    a = {"model": cfg["model"], "batch": cfg["batch"], "n_global": cfg["n_global"], "n_local": cfg["n_local"],
         "gsize": cfg["global_size"], "lsize": cfg["local_size"], "prototypes": cfg["prototypes"],
         "hidden": cfg["hidden"], "bottleneck": cfg["bottleneck"], "device": cfg["device"],
         "precision": cfg["precision"]}
    if a["device"] == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda (the {args.config} config) needs a CUDA device; use --config cpu")
    args.variants = [""] + [v for v in args.variants if v]
    args.sequential = args.sequential or a["device"] == "cuda"
    if args.peak_tflops is None:
        args.peak_tflops = device_peak_tflops(a["device"])
    threads = args.threads if a["device"] == "cpu" else [args.threads[0]]
    results: dict = {}
    for method in args.methods:
        results[method] = {}
        for t in threads:
            print(f"{method}, {t} thread(s) ...", flush=True)
            rows = run_group(method, t, a, args)
            results[method][str(t)] = rows
            for lib, r in rows.items():
                if "error" in r:
                    print(f"  {lib:28s} error: {r['error']}")
                else:
                    ratio = f"{r['time_vs_dinokit']:.2f}x" if "time_vs_dinokit" in r else ""
                    mfu = f" MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
                    print(f"  {lib:28s} {r['median_ms']:8.1f} ms  cpu {r['median_cpu_ms']:8.1f} ms  "
                          f"{ratio:>7s}  {r['peak_mb']:7.0f} MB{mfu}")
    res = {"args": a, "results": results, "mode": "sequential" if args.sequential else "interleaved",
           "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
           "command": "benchmarks/step_time.py " + " ".join(sys.argv[1:]), "versions": versions(),
           "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
                       "gpu": torch.cuda.get_device_name() if a["device"] == "cuda" else None,
                       "peak_tflops": args.peak_tflops, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
    out = args.out or ROOT / "benchmarks" / "results" / f"step_time_{args.config}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"written: {out}")
    if args.write_md:
        key = {"cpu": "cpu", "gpu": "gpu"}.get(args.config, args.config)
        write_section(MD, f"step-time-{key}", f"Training step ({key})", markdown(res))
        print(f"written: {MD}")


if __name__ == "__main__":
    main()
