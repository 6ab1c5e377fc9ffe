"""GPU suite: every GPU claim of dinokit measured in one short run on a lent device (one H100:
at most 8 minutes with the set-up), written as JSON and as a Markdown table.

    bash benchmarks/gpu_suite.sh --out "$OUT"              # on the GPU machine (installs .whl/ first)
    bash benchmarks/gpu_suite.sh --dry-run --out /tmp/gs   # anywhere: CPU, toy sizes, under a minute

Parts, in this order; each has its own time budget and is stopped by it; a part that cannot run
here says ``skipped: <reason>`` (no GPU, no peer package, no NCCL), one that breaks says
``failed: <error>``, and the report is written whatever happens:

- ``env``: device, versions, the device's dense bf16 peak by name (:data:`common.BF16_PEAK`) and a
  measured bf16 matrix-product rate (8192^3, median of timed products after warm-up).
- ``step``: the training step of dinokit against stable-pretraining, lightly and nidl (the steps of
  ``step_time.py`` / ``peer_step.py``, one worker process each, one at a time) for DINO, DINOv2 and
  DINOv3 (peers where they have the method): ViT-S/16, batch 64, 2 x 224 + 10 x 96 crops, 65,536
  prototypes, bf16 autocast. Blocks of back-to-back steps after warm-up steps, the device
  synchronised before and after each block only; images/s from the median block; peak memory
  from ``torch.cuda.max_memory_allocated`` reset before each block; FLOPs of one step counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (each library's own step: work a library skips is
  not counted for it), TFLOP/s and MFU against the device's dense bf16 peak.
- ``data_path``: ``data_path.py``'s paths on JPEGs: torchvision's textbook per-sample pipeline
  (one core) against dinokit's decode + ``BatchedMultiCrop`` with ``roi_align`` on the device.
- ``sync``: dinokit's training step (``TrainingStep``, bf16) under
  ``torch.cuda.set_sync_debug_mode``: synchronising calls per step outside logging steps counted
  in ``warn`` mode (0 expected), then steps in ``error`` mode; beside it, the dispatch-level count
  of ``tests/test_no_sync.py`` (``.item()``, ``nonzero``, boolean-mask indexing), the only count
  on a CPU; and the syncs of one logging step (metrics read back), for scale.
- ``gpu_tests``: the test suite's GPU-only tests through pytest (the EMA update after a device
  move, the same crops on CPU and GPU for one seed, the steps under sync debug mode ``error``).
- ``precision``: bf16 autocast against fp32 (TF32 off) on the same weights, inputs and random
  draws: relative difference of the loss and of the student's gradient, per method.
- ``fsdp2``: two training steps with student and teacher sharded by FSDP2 (``fully_shard``) in a
  one-process group (NCCL on the GPU, gloo on the CPU), DINO and DINOv2.

The parts run in runner processes (one per part with ``--isolate``, the default except in a dry
run, where one runner saves the imports); the driver reads a runner's progress, kills its process
group when the running part's budget runs out, and goes on with the next part in a fresh runner.
Each part imports its libraries itself, inside its budget, so that a missing package becomes that
part's skip line rather than the suite's end.

``--dry-run``: the same parts on the CPU at toy sizes (12-block ViT-Tiny on 32-px crops, 256
prototypes, batch 2): a check that the suite runs, not a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("env", "step", "data_path", "sync", "gpu_tests", "precision", "fsdp2")
METHODS = ("dino", "dinov2", "dinov3")
PEER_MODULES = {"stable-pretraining": "stable_pretraining", "lightly": "lightly", "nidl": "nidl"}
#: the peers that have each method (step_time.PEERS without lightly's per-crop example)
PEERS = {"dino": ["stable-pretraining", "lightly", "nidl"], "dinov2": ["stable-pretraining", "lightly"],
         "dinov3": ["stable-pretraining", "lightly"]}
#: the GPU-only tests of the test suite (skipped there without a GPU)
GPU_TESTS = ("tests/test_ema.py::test_update_follows_a_device_move",
             "tests/test_batched_augment.py::test_the_same_seed_gives_the_same_crops_on_cpu_and_gpu",
             "tests/test_no_sync.py::test_cuda_steps_pass_under_sync_debug_mode_error")

#: step sizes: the GPU configuration of step_time.py, and the dry run's toy one
FULL = dict(model="vit_small_patch16_224", batch=64, n_global=2, n_local=10, gsize=224, lsize=96,
            prototypes=65536, hidden=2048, bottleneck=256, device="cuda", precision="bf16", threads=4)
DRY = dict(model="vit_tiny_patch16_224", batch=2, n_global=2, n_local=2, gsize=32, lsize=16,
           prototypes=256, hidden=64, bottleneck=32, device="cpu", precision="bf16", threads=1)
#: per part: seconds (full run, dry run). The full budgets sum to 7.25 minutes, which leaves the
#: set-up (installing the carried wheels) inside 8 minutes.
#: The dry run's are caps for slow, shared machines: on two idle cores it takes under a minute.
BUDGETS = {"env": (20, 30), "step": (235, 180), "data_path": (40, 45), "sync": (40, 60),
           "gpu_tests": (40, 60), "precision": (25, 45), "fsdp2": (35, 45)}
#: timing of the step part (full, dry): warm-up steps, timed blocks, steps per block
STEP_TIMING = {"full": (3, 3, 10), "dry": (1, 2, 1)}


# ------------------------------------------------------------------------------------ results
def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def skipped(reason: str) -> str:
    return f"skipped: {reason}"


def has_figures(row: dict) -> bool:
    return "skipped" not in row and "failed" not in row


def part_result(rows: list[dict], notes: list[str] | None = None, **extra: Any) -> dict:
    """A part's result: ``ok`` when some row holds figures, else ``skipped`` with the rows' reasons."""
    res: dict[str, Any] = {"rows": rows, "notes": notes or [], **extra}
    if any(has_figures(r) for r in rows):
        res["status"] = "ok"
    else:
        reasons = sorted({r.get("skipped") or r.get("failed") or "skipped: no rows" for r in rows}) or \
            ["skipped: no rows"]
        failed = [r for r in reasons if r.startswith("failed")]
        res["status"] = "failed" if failed else "skipped"
        res["reason"] = failed[0] if failed else (
            reasons[0] if len(reasons) == 1 else "skipped: " + "; ".join(r[len("skipped: "):] for r in reasons))
    return res


# ------------------------------------------------------------------------------------ parts
class Part:
    """What a part gets: the suite's settings, its budget, and ``save`` for partial results."""

    def __init__(self, name: str, settings: dict, budget: float, save: Callable[[dict], None]):
        self.name, self.s, self.budget, self.save = name, settings, budget, save
        self.start = time.monotonic()
        self.a: dict = settings["config"]

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    @property
    def cuda(self) -> bool:
        return self.a["device"] == "cuda"


def no_cuda_reason(part: Part) -> str | None:
    """Why a full (not dry) run cannot use CUDA here, if it cannot."""
    import torch

    if part.cuda and not torch.cuda.is_available():
        return skipped("no CUDA device (torch.cuda.is_available() is False)")
    return None


def run_env(part: Part) -> dict:
    import importlib.metadata as md

    import torch
    import torch.distributed as dist
    from common import BF16_PEAK, cpu_name

    rows: list[dict] = []

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    for package in ("torch", "torchvision", "timm", "lightning", "numpy", "stable-pretraining", "lightly", "nidl"):
        rows.append({"item": package, "value": version(package)})
    rows.append({"item": "python", "value": platform.python_version()})
    rows.append({"item": "cpu", "value": f"{cpu_name()} ({len(os.sched_getaffinity(0))} cores visible)"})
    if not torch.cuda.is_available():
        rows.append({"item": "gpu", "skipped": skipped("no CUDA device")})
        return part_result(rows, device="cpu", peak_tflops=None)
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    peak = next((v / 1e12 for k, v in BF16_PEAK.items() if k in name), None)
    rows += [{"item": "gpu", "value": name},
             {"item": "compute capability", "value": f"{props.major}.{props.minor}"},
             {"item": "multiprocessors", "value": props.multi_processor_count},
             {"item": "memory GiB", "value": round(props.total_memory / 2**30, 1)},
             {"item": "CUDA (torch)", "value": torch.version.cuda},
             {"item": "NCCL available", "value": dist.is_available() and dist.is_nccl_available()},
             {"item": "bf16 dense peak TFLOP/s (datasheet)", "value": peak if peak else "unknown for this name"}]
    n = 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        x @ y
    times = []
    for _ in range(10):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        x @ y
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) / 1000)
    times.sort()
    measured = 2 * n**3 / times[len(times) // 2] / 1e12
    rows.append({"item": "bf16 matmul TFLOP/s (measured, 8192^3, median of 10)", "value": round(measured, 1)})
    return part_result(rows, device=name, peak_tflops=peak, matmul_tflops=measured)


def probe_peers(python: str) -> dict[str, str | None]:
    """Per peer: None when its package is found by ``python``, else the skip reason."""
    code = ("import importlib.util, json; print(json.dumps({n: importlib.util.find_spec(n) is not None "
            f"for n in {list(PEER_MODULES.values())!r}}}))")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
        found = json.loads(r.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return {p: skipped(f"{python} cannot be asked for packages") for p in PEER_MODULES}
    return {p: None if found.get(m) else skipped(f"{p} is not installed for {python}")
            for p, m in PEER_MODULES.items()}


def run_step(part: Part) -> dict:
    from argparse import Namespace

    from step_time import Worker, summarise

    if (reason := no_cuda_reason(part)) is not None:
        return part_result([{"skipped": reason}])
    a = part.a
    warmup, blocks, steps = STEP_TIMING["dry" if part.s["dry_run"] else "full"]
    peer_py = part.s["peer_python"]
    missing = probe_peers(peer_py)
    plan = [(m, lib) for m in part.s["methods"] for lib in ["dinokit", *PEERS[m]]]
    runnable = [(m, lib) for m, lib in plan if lib == "dinokit" or missing[lib] is None]
    rows: list[dict] = []
    env = load(Path(part.s["results"]) / "env.json") or {}
    peak = env.get("peak_tflops")  # by the env part's device name (this process leaves CUDA alone)
    margin = 5.0  # for summarising and writing
    for method in part.s["methods"]:
        entries: list[Any] = []  # per library in order: its worker, or its row when it did not run
        for lib in ["dinokit", *PEERS[method]]:
            if lib != "dinokit" and missing[lib]:
                entries.append({"method": method, "library": lib, "skipped": missing[lib]})
                continue
            # up to 1.5 equal shares of what is left: a slow import need not cost a library its
            # figures; when the budget runs short, the last method's last peers go first
            left = part.left() - margin
            share = min(left, 1.5 * left / max(1, len(runnable)))
            runnable.remove((method, lib))
            if share < 3:
                entries.append({"method": method, "library": lib,
                                "skipped": skipped(f"the step part's {part.budget:.0f} s budget ran out")})
                continue
            w = time_worker(method, lib, a, peer_py, share, (warmup, blocks, steps))
            if w.error and w.error.startswith(("ModuleNotFoundError", "ImportError")):
                entries.append({"method": method, "library": lib,
                                "skipped": skipped(f"{lib} does not import here: {w.error}")})
                continue
            entries.append(w)
        workers = [e for e in entries if isinstance(e, Worker)]
        summary = summarise(workers, a["threads"], a, Namespace(peak_tflops=peak)) if workers else {}
        rows += step_rows(method, summary, entries)
        part.save(part_result(rows))
    notes = [f"{a['model']}, batch {a['batch']}, {a['n_global']} x {a['gsize']} + {a['n_local']} x {a['lsize']} "
             f"crops, {a['prototypes']} prototypes (CLS and patch heads), head {a['hidden']}/{a['bottleneck']}, "
             f"{a['precision']}; {warmup} warm-up step(s), then {blocks} blocks of {steps} step(s), "
             f"synchronised at each block's ends only",
             "dinokit's step: step_time.dinokit_step (fused AdamW); the peers': peer_step.py",
             f"images/s: batch / median step time (each image with its {a['n_global'] + a['n_local']} crops)",
             "peak memory: " + ("torch.cuda.max_memory_allocated over the timed block, reset before it" if part.cuda
                                else "the worker's maximum resident set size (CPU)"),
             f"MFU: counted FLOPs / step time / {peak} TFLOP/s (dense bf16 peak of {env.get('device')})" if peak
             else "MFU: no dense bf16 peak is known for this device (common.BF16_PEAK)"]
    return part_result(rows, notes, peak_tflops=peak)


def time_worker(method: str, lib: str, a: dict, peer_py: str, seconds: float, timing: tuple[int, int, int]):
    """One library's step in its worker: warm-up steps, timed blocks, the FLOPs of one step; the
    worker is killed after ``seconds`` (blocks timed by then are kept)."""
    from step_time import Worker

    warmup, blocks, steps = timing
    cmd = [sys.executable, str(HERE / "step_time.py"), "--worker", method, "", json.dumps(a)] \
        if lib == "dinokit" else [peer_py, str(HERE / "peer_step.py"), lib, method, json.dumps(a)]
    w = Worker(lib, cmd)
    fired = threading.Event()
    timer = threading.Timer(seconds, lambda: (fired.set(), w.proc.kill()))
    timer.start()
    try:
        if "ready" in w.ask(None) and "ok" in w.ask(f"warmup {warmup}"):
            for _ in range(blocks):
                rep = w.ask(f"block {steps}")
                if "wall_ms" not in rep:
                    break
                w.rounds.append(rep)
            if w.rounds and not w.error:
                w.flops = w.ask("flops").get("flops")
    finally:
        timer.cancel()
        w.close()
    w.stopped = fired.is_set() and not w.rounds
    if fired.is_set():
        w.error = None if w.rounds else f"stopped by its {seconds:.0f} s share of the step budget"
    print(f"[step] {method} {lib}: {len(w.rounds)} blocks, error={w.error}", file=sys.stderr, flush=True)
    return w


def step_rows(method: str, summary: dict, entries: list) -> list[dict]:
    """The step part's rows of one method, with dinokit's ratios to the fastest peer."""
    rows = []
    for w in entries:
        if isinstance(w, dict):
            rows.append(w)
            continue
        r = summary.get(w.label, {"error": w.error or "no result"})
        if w.stopped:
            rows.append({"method": method, "library": w.label, "skipped": skipped(w.error)})
            continue
        if "error" in r:
            rows.append({"method": method, "library": w.label, "failed": f"failed: {r['error']}"})
            continue
        rows.append({"method": method, "library": w.label, "images_per_s": r["images_per_s"],
                     "ms_per_step": r["median_ms"], "peak_mib": r["peak_mb"], "blocks": len(w.rounds),
                     "gflop_per_step": r.get("gflop_per_step"), "tflop_s": r.get("tflop_s"), "mfu": r.get("mfu"),
                     "time_vs_dinokit": r.get("time_vs_dinokit")})
    ours = next((r for r in rows if r["library"] == "dinokit" and has_figures(r)), None)
    peers = [r for r in rows if r["library"] != "dinokit" and has_figures(r)]
    if ours and peers:
        fastest = max(peers, key=lambda r: r["images_per_s"])
        ours["fastest_peer"] = fastest["library"]
        ours["throughput_vs_fastest_peer"] = ours["images_per_s"] / fastest["images_per_s"]
        ours["memory_vs_fastest_peer"] = ours["peak_mib"] / fastest["peak_mib"]
    return rows


def run_data_path(part: Part) -> dict:
    import data_path
    import torch

    if (reason := no_cuda_reason(part)) is not None:
        return part_result([{"skipped": reason}])
    torch.set_num_threads(1)  # one DataLoader worker's core
    torch.manual_seed(0)
    batch, rounds = (64, 3) if not part.s["dry_run"] else (4, 1)
    info = data_path.measure(batch, rounds, part.a["device"], resize="roi_align")
    labels = {"textbook": "textbook torchvision v2 on PIL, per sample",
              "per_sample": "dinokit MultiCropTransform, per sample",
              "dinokit": f"dinokit DecodeUInt8 + BatchedMultiCrop ({info['resize']} on {info['device']})",
              "augment_only": f"dinokit BatchedMultiCrop alone (decoded images on {info['device']})"}
    rows = [{"path": labels[k], "images_per_s": r["images_per_s_wall"], "images_per_cpu_s": r["images_per_cpu_s"],
             "vs_textbook": r["ratio_wall"]} for k, r in info["results"].items()]
    notes = [f"batches of {batch} JPEGs (500 x 375) -> 2 x 224 + 8 x 96 normalised crops, 1 torch thread, "
             f"median of {rounds} interleaved rounds per path"]
    return part_result(rows, notes)


def method_batches(a: dict, method: str, n: int) -> list[dict]:
    """``n`` collated batches of random crops (masks from DINOv2's block generator for v2/v3)."""
    import torch

    from dinokit.data import MultiCropCollate
    from dinokit.masking import make_mask_generator

    grid = a["gsize"] // 16
    collate = MultiCropCollate(make_mask_generator("block", (grid, grid)), patch_size=16) \
        if method != "dino" else MultiCropCollate()
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        items = [({"global_views": [torch.randn(3, a["gsize"], a["gsize"], generator=g) for _ in range(a["n_global"])],
                   "local_views": [torch.randn(3, a["lsize"], a["lsize"], generator=g) for _ in range(a["n_local"])]},
                  0) for _ in range(a["batch"])]
        b = collate(items)
        out.append({k: ([t.to(a["device"]) for t in v] if isinstance(v, list) else
                        v.to(a["device"]) if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
    return out


def training_step(method, a: dict):
    from dinokit.settings import OptimSettings
    from dinokit.train.step import StepSettings, TrainingStep, build_method_optimizer

    precision = "bf16-mixed" if a["precision"] == "bf16" else "32-true"
    optim = OptimSettings(warmup_epochs=0)
    step = TrainingStep(method, build_method_optimizer(method, optim), StepSettings(optim=optim, precision=precision))
    return step


def run_sync(part: Part) -> dict:
    import warnings

    import torch
    from step_time import dinokit_method

    if (reason := no_cuda_reason(part)) is not None:
        return part_result([{"skipped": reason}])
    sys.path.insert(0, str(ROOT / "tests"))
    from test_no_sync import CountSyncs

    a = {**part.a, "batch": min(part.a["batch"], 16)}
    n_steps = 4
    rows: list[dict] = []
    for name in part.s["methods"]:
        torch.manual_seed(0)
        method = dinokit_method(name, a)
        step = training_step(method, a)
        step.plan(n_steps + 4, n_steps + 4, a["batch"])
        batches = method_batches(a, name, 2)
        step(batches[0], step=0, epoch=0)  # the first call may sync (lazy initialisation)
        if part.cuda:
            torch.cuda.synchronize()
        dispatch, debug = [], []
        for i in range(1, n_steps + 1):
            mode = CountSyncs()
            with warnings.catch_warnings(record=True) as seen, mode:
                warnings.simplefilter("always")
                if part.cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    step(batches[i % 2], step=i, epoch=0)
                finally:
                    if part.cuda:
                        torch.cuda.set_sync_debug_mode("default")
            dispatch.append(mode.count)
            debug.append(sum("synchroniz" in str(w.message) for w in seen))
        row: dict = {"method": name, "steps": n_steps, "syncs_per_step_dispatch": dispatch}
        if part.cuda:
            row["syncs_per_step_debug_mode"] = debug
            try:
                torch.cuda.set_sync_debug_mode("error")
                for i in range(n_steps + 1, n_steps + 3):
                    step(batches[i % 2], step=i, epoch=0)
                row["error_mode"] = "passed"
            except RuntimeError as e:
                row["error_mode"] = f"raised: {str(e).splitlines()[0][:200]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            row["syncs_per_step_debug_mode"] = skipped("torch.cuda.set_sync_debug_mode needs a CUDA device")
        mode = CountSyncs()
        with mode:  # a logging step: the step, then its metrics and the non-finite guard read back
            res = step(batches[0], step=n_steps + 3, epoch=0)
            [float(v) for v in res.metrics.values() if isinstance(v, torch.Tensor)]
            step.check_nonfinite(n_steps + 3, 0)
        row["syncs_logging_step_dispatch"] = mode.count
        counts = dispatch + (debug if part.cuda else [])
        row["syncs_outside_logging_steps"] = max(counts)
        rows.append(row)
        part.save(part_result(rows))
        del method, step, batches
        if part.cuda:
            torch.cuda.empty_cache()
    notes = [f"TrainingStep ({a['precision']}), batch {a['batch']}, {a['n_global']} x {a['gsize']} + "
             f"{a['n_local']} x {a['lsize']} crops, {a['prototypes']} prototypes; one first step, then "
             f"{n_steps} counted steps; 0 expected outside logging steps"]
    return part_result(rows, notes)


def run_gpu_tests(part: Part) -> dict:
    """pytest in this process (torch and the test modules may be loaded already): the part's
    budget is kept by the driver, which ends the process when it runs out."""
    import xml.etree.ElementTree as ET

    import pytest

    sys.path.insert(0, str(ROOT / "tests"))
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        code = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rA", f"--rootdir={ROOT}",
                            f"--junitxml={xml}", *(str(ROOT / t) for t in GPU_TESTS)])
        if not xml.exists():
            return part_result([{"failed": f"failed: pytest wrote no report (exit {int(code)})"}])
        rows = []
        for case in ET.parse(xml).iter("testcase"):
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            row: dict = {"test": name, "seconds": float(case.get("time", 0))}
            skip = case.find("skipped")
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if skip is not None:
                row["skipped"] = skipped(skip.get("message", "").removeprefix("Skipped: ") or "skipped by pytest")
            elif bad is not None:
                row["failed"] = f"failed: {(bad.get('message') or '').splitlines()[0][:300] if bad.get('message') else ''}"
            else:
                row["outcome"] = "passed"
            rows.append(row)
    if not rows:
        return part_result([{"failed": f"failed: pytest collected no test (exit {int(code)})"}])
    return part_result(rows)


def run_precision(part: Part) -> dict:
    import copy

    import torch
    from common import make_views
    from step_time import dinokit_method

    if (reason := no_cuda_reason(part)) is not None:
        return part_result([{"skipped": reason}])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    a = {**part.a, "batch": min(part.a["batch"], 16)}
    glob, loc = make_views(a["batch"], a["n_global"], a["n_local"], a["gsize"], a["lsize"], a["device"])
    rows = []
    for name in part.s["methods"]:
        torch.manual_seed(0)
        ref = dinokit_method(name, a)
        got = {}
        for prec in ("fp32", "bf16"):
            m = copy.deepcopy(ref)
            torch.manual_seed(1)  # the same masks and stochastic-depth draws in both runs
            with torch.autocast(a["device"], dtype=torch.bfloat16, enabled=prec == "bf16"):
                out = m(global_views=glob, local_views=loc)
            out.loss.backward()
            grad = torch.cat([p.grad.flatten().float() for p in m.student_parameters() if p.grad is not None])
            got[prec] = (out.loss.detach().float(), grad)
            del m, out
        (l32, g32), (l16, g16) = got["fp32"], got["bf16"]
        rows.append({"method": name, "loss_fp32": float(l32), "loss_bf16": float(l16),
                     "loss_rel_diff": float((l16 - l32).abs() / l32.abs().clamp_min(1e-12)),
                     "grad_rel_diff": float((g16 - g32).norm() / g32.norm().clamp_min(1e-12)),
                     "finite": bool(torch.isfinite(l16) and torch.isfinite(g16).all())})
        part.save(part_result(rows))
        del ref, got
    notes = [f"one forward + backward, batch {a['batch']}, {a['n_global']} x {a['gsize']} + {a['n_local']} x "
             f"{a['lsize']} crops, {a['prototypes']} prototypes; fp32 with TF32 off is the reference; "
             "bf16 operands usually land between 1e-3 and 1e-2"]
    return part_result(rows, notes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fsdp2(part: Part) -> dict:
    import torch
    import torch.distributed as dist
    from common import make_views
    from step_time import dinokit_method

    from dinokit.train.strategy import shard_method

    if (reason := no_cuda_reason(part)) is not None:
        return part_result([{"skipped": reason}])
    if not dist.is_available():
        return part_result([{"skipped": skipped("torch.distributed is not available")}])
    backend = "nccl" if part.cuda else "gloo"
    if part.cuda:
        torch.cuda.set_device(0)
    if backend == "nccl" and not dist.is_nccl_available():
        return part_result([{"skipped": skipped("this torch has no NCCL")}])
    a = {**part.a, "batch": min(part.a["batch"], 32)}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    rows = []
    try:
        for name in [m for m in ("dino", "dinov2") if m in part.s["methods"]]:
            torch.manual_seed(0)
            method = dinokit_method(name, a)
            shard_method(method)
            sharded = type(next(method.teacher.parameters())).__name__ == "DTensor"
            step = training_step(method, a)  # after sharding: the optimiser holds the sharded parameters
            step.plan(2, 2, a["batch"])
            glob, loc = make_views(a["batch"], a["n_global"], a["n_local"], a["gsize"], a["lsize"], a["device"])
            batch = {"global_views": glob, "local_views": loc}
            if part.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            for i in range(2):
                t0 = time.perf_counter()
                losses.append(step(batch, step=i, epoch=0).output.loss.detach())
                if part.cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1000)
            loss = [float(x) for x in losses]
            rows.append({"method": name, "backend": backend, "world_size": dist.get_world_size(),
                         "sharded": sharded, "steps": 2, "ms_step_2": times[1], "loss": loss,
                         "finite": all(torch.isfinite(torch.tensor(loss)).tolist()),
                         "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if part.cuda else None,
                         "skipped_steps": int(step.nonfinite_total) if step.nonfinite_total is not None else 0})
            part.save(part_result(rows))
            del method, step
    finally:
        dist.destroy_process_group()
    notes = [f"TrainingStep ({a['precision']}) with fully_shard on each block and network of student and teacher; "
             f"batch {a['batch']}, {a['n_global']} x {a['gsize']} + {a['n_local']} x {a['lsize']} crops; "
             "each step timed with the device synchronised after it"]
    return part_result(rows, notes)


RUNNERS: dict[str, Callable[[Part], dict]] = {
    "env": run_env, "step": run_step, "data_path": run_data_path, "sync": run_sync, "gpu_tests": run_gpu_tests,
    "precision": run_precision, "fsdp2": run_fsdp2}


def runner(settings_file: Path, names: list[str]) -> None:
    """Run ``names`` in turn, saying ``START name`` / ``DONE name`` on stdout (library prints go to
    stderr); each part's result goes to ``<results>/<name>.json``."""
    settings = json.loads(settings_file.read_text())
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT / "src"))
    # the progress lines get a descriptor of their own; anything else written to stdout, by Python or
    # by native code, goes to stderr (the log)
    sys.stdout.flush()
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    results = Path(settings["results"])
    for name in names:
        budget = settings["budgets"][name]
        out = results / f"{name}.json"

        def save(res: dict, out: Path = out) -> None:
            write_atomic(out, json.dumps(res, default=str))

        proto.write(f"START {name}\n")
        proto.flush()
        t0 = time.monotonic()
        print(f"=== part {name} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
        try:
            res = RUNNERS[name](Part(name, settings, budget, save))
        except Exception as e:  # the part's failure is its line in the report, not the suite's end
            traceback.print_exc()
            message = str(e).splitlines()[0][:300] if str(e) else ""
            partial = load(out) or {}
            res = part_result([*partial.get("rows", []), {"failed": f"failed: {type(e).__name__}: {message}"}],
                              partial.get("notes"))
        res["seconds"] = time.monotonic() - t0
        save(res)
        proto.write(f"DONE {name}\n")
        proto.flush()


# ------------------------------------------------------------------------------------ driver
def drive(args: argparse.Namespace, settings: dict, log, results: dict[str, dict]) -> None:
    """Run the parts through runners, each part stopped by its budget, into ``results``."""
    results_dir = Path(settings["results"])
    settings_file = results_dir / "settings.json"
    pending = list(args.parts)
    t_end = args.deadline
    while pending:
        left = t_end - time.monotonic()
        for name in list(pending):  # the total budget: what is left, the part's own budget at most
            settings["budgets"][name] = min(settings["budgets"][name], max(0.0, left - 2))
        too_late = [n for n in pending if settings["budgets"][n] < 3]
        for n in too_late:
            results[n] = {"status": "skipped", "rows": [], "seconds": 0.0,
                          "reason": skipped(f"the suite's total budget of {args.total_budget:.0f} s ran out")}
            pending.remove(n)
        if not pending:
            break
        write_atomic(settings_file, json.dumps(settings))
        group = pending[:1] if args.isolate else list(pending)
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--runner", str(settings_file), *group],
                                stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, start_new_session=True)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=forward_lines, args=(proc.stdout, lines), daemon=True).start()
        current, started = None, time.monotonic()
        while True:
            wait = settings["budgets"][current] - (time.monotonic() - started) if current else \
                max(1.0, t_end - time.monotonic())
            try:
                line = lines.get(timeout=max(0.0, wait))
            except queue.Empty:
                line = "TIMEOUT"
            if line is None or line == "TIMEOUT":
                if line == "TIMEOUT":
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if current is not None:  # the part ran out of time or its runner died
                    partial = load(results_dir / f"{current}.json")
                    if line == "TIMEOUT":
                        why = skipped(f"stopped by its {settings['budgets'][current]:.0f} s budget")
                    else:
                        why = f"failed: the part's process ended with exit code {proc.returncode}"
                    results[current] = finish_partial(partial, why, time.monotonic() - started,
                                                      settings["budgets"][current])
                    pending.remove(current)
                elif line == "TIMEOUT" or proc.returncode:
                    for n in group:
                        results[n] = {"status": "failed", "rows": [], "seconds": 0.0,
                                      "reason": f"failed: the runner ended with exit code {proc.returncode}"}
                        pending.remove(n)
                break
            word, name = line.split(maxsplit=1) if " " in line else (line.strip(), "")
            name = name.strip()
            if word == "START":
                current, started = name, time.monotonic()
                print(f"[gpu_suite] {name} ... (budget {settings['budgets'][name]:.0f} s)", flush=True)
            elif word == "DONE":
                res = load(results_dir / f"{name}.json") or {"status": "failed", "reason": "failed: no result",
                                                            "rows": []}
                res["budget_s"] = settings["budgets"][name]
                results[name] = res
                pending.remove(name)
                print(f"[gpu_suite] {name}: {res.get('reason') or res['status']} ({res.get('seconds', 0):.1f} s)",
                      flush=True)
                current = None
        if proc.poll() is None:
            proc.wait()


def forward_lines(stream, lines: queue.Queue) -> None:
    """The runner's progress lines into ``lines``, then None at its end."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finish_partial(partial: dict | None, why: str, seconds: float, budget: float) -> dict:
    """A part stopped from outside: its saved rows, if any, and the reason it stopped."""
    if partial and any(has_figures(r) for r in partial.get("rows", [])):
        res = {**partial, "status": "ok", "notes": [*partial.get("notes", []), why.removeprefix("skipped: ")]}
    else:
        res = {"status": "failed" if why.startswith("failed") else "skipped", "reason": why,
               "rows": (partial or {}).get("rows", [])}
    res.update(seconds=seconds, budget_s=budget)
    return res


# ------------------------------------------------------------------------------------ report
def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.2e}"
    if isinstance(v, list):
        return ", ".join(fmt(x, digits) for x in v)
    return str(v)


def pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f} %"


def ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


TABLES: dict[str, list[tuple[str, str, Callable[[Any], str]]]] = {
    "env": [("item", "item", str), ("value", "value", fmt)],
    "step": [("method", "method", str), ("library", "library", str), ("images/s", "images_per_s", fmt),
             ("ms / step", "ms_per_step", fmt), ("peak MiB", "peak_mib", lambda v: fmt(v, 0)),
             ("GFLOP / step", "gflop_per_step", fmt), ("TFLOP/s", "tflop_s", fmt), ("MFU", "mfu", pct),
             ("step time vs dinokit", "time_vs_dinokit", ratio),
             ("throughput vs fastest peer", "throughput_vs_fastest_peer", ratio),
             ("memory vs fastest peer", "memory_vs_fastest_peer", ratio)],
    "data_path": [("path", "path", str), ("images/s (wall)", "images_per_s", fmt),
                  ("images per CPU-second", "images_per_cpu_s", fmt), ("vs textbook", "vs_textbook", ratio)],
    "sync": [("method", "method", str), ("syncs outside logging steps (max)", "syncs_outside_logging_steps", fmt),
             ("per step, sync debug mode", "syncs_per_step_debug_mode", fmt),
             ("per step, dispatch count", "syncs_per_step_dispatch", fmt), ("error mode", "error_mode", str),
             ("logging step, dispatch count", "syncs_logging_step_dispatch", fmt)],
    "gpu_tests": [("test", "test", str), ("outcome", "outcome", str), ("s", "seconds", fmt)],
    "precision": [("method", "method", str), ("loss fp32", "loss_fp32", lambda v: fmt(v, 5)),
                  ("loss bf16", "loss_bf16", lambda v: fmt(v, 5)), ("loss rel. diff", "loss_rel_diff", lambda v: fmt(v, 4)),
                  ("grad rel. diff", "grad_rel_diff", lambda v: fmt(v, 4)), ("finite", "finite", fmt)],
    "fsdp2": [("method", "method", str), ("backend", "backend", str), ("sharded", "sharded", fmt),
              ("ms (step 2)", "ms_step_2", fmt), ("peak MiB", "peak_mib", lambda v: fmt(v, 0)),
              ("loss (steps 1, 2)", "loss", lambda v: fmt(v, 4)), ("finite", "finite", fmt)],
}
TITLES = {"env": "Device and versions", "step": "Training step", "data_path": "Multi-crop data path",
          "sync": "Host syncs per training step", "gpu_tests": "GPU-only tests",
          "precision": "bf16 against fp32", "fsdp2": "FSDP2, one process"}


def markdown(report: dict) -> str:
    head = report["header"]
    lines = [f"# dinokit GPU suite{' (dry run: CPU, toy sizes, not figures)' if report['dry_run'] else ''}", "",
             f"{head['date']}; {head['device']}; torch {head['torch']}; Python {head['python']}. "
             f"Command: `{head['command']}`. {report['seconds']:.0f} s in all.", ""]
    for name in report["order"]:
        res = report["parts"][name]
        lines += [f"## {TITLES[name]} (`{name}`)", "",
                  f"{res['status']}, {res.get('seconds', 0):.1f} s of a {res.get('budget_s', 0):.0f} s budget."
                  + (f" {res['reason']}" if res.get("reason") else ""), ""]
        lines += [f"- {n}" for n in res.get("notes", [])] + ([""] if res.get("notes") else [])
        rows = res.get("rows", [])
        cols = TABLES[name]
        if (rows and any(has_figures(r) for r in rows)) or len(rows) > 1:
            lines.append("| " + " | ".join(c[0] for c in cols) + " |")
            lines.append("| " + " | ".join("---" for _ in cols) + " |")
            for r in rows:
                if has_figures(r):
                    lines.append("| " + " | ".join(f(r[k]) if r.get(k) is not None else "" for _, k, f in cols) + " |")
                else:
                    ident = [str(r[k]) for _, k, _ in cols[:2] if k in r and isinstance(r[k], str)]
                    cells = [*ident, r.get("skipped") or r.get("failed")]
                    lines.append("| " + " | ".join(cells + [""] * (len(cols) - len(cells))) + " |")
            lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--runner"]:
        runner(Path(argv[1]), argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, under a minute (a check, not figures)")
    p.add_argument("--out", type=Path,
                   help="folder for gpu_suite.json, .md and .log (gpu_suite_dry.* in a dry run); default "
                        "benchmarks/results, or a folder in the temporary directory for a dry run")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--peer-python", default=sys.executable,
                   help="the Python that runs the peers (default this one, as on the GPU machine; "
                        "e.g. .bench-venv/bin/python here)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's budget")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                   help="one part's budget in seconds (after --budget-scale); repeatable")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one process per part (default: on, except in a dry run)")
    args = p.parse_args(argv)
    mode = "dry" if args.dry_run else "full"
    args.isolate = (not args.dry_run) if args.isolate is None else args.isolate
    budgets = {n: BUDGETS[n][0 if mode == "full" else 1] * args.budget_scale for n in PARTS}
    for item in args.budget:
        name, _, value = item.partition("=")
        try:
            if name not in PARTS:
                raise ValueError
            budgets[name] = float(value)
        except ValueError:
            p.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
    args.total_budget = sum(budgets[n] for n in args.parts) + 5
    t0 = time.monotonic()
    args.deadline = t0 + args.total_budget
    stem = "gpu_suite_dry" if args.dry_run else "gpu_suite"
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "dinokit-gpu-suite" if args.dry_run else ROOT / "benchmarks" / "results"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_suite.") as tmp, open(args.out / f"{stem}.log", "w") as log:
        settings = {"dry_run": args.dry_run, "config": DRY if args.dry_run else FULL, "methods": args.methods,
                    "peer_python": args.peer_python, "budgets": budgets, "results": tmp}
        order = [n for n in PARTS if n in args.parts]  # env first: the step part reads its peak
        args.parts = order
        results: dict[str, dict] = {}
        try:
            drive(args, settings, log, results)
        except Exception as e:  # the report is written whatever happens
            traceback.print_exc(file=log)
            for name in order:
                results.setdefault(name, {"status": "failed", "rows": [], "seconds": 0.0,
                                          "reason": f"failed: the suite's driver broke: {type(e).__name__}: {e}"})
    env = {r["item"]: r.get("value") for r in results.get("env", {}).get("rows", []) if "item" in r}
    report = {
        "suite": "dinokit gpu_suite", "dry_run": args.dry_run, "order": order, "seconds": time.monotonic() - t0,
        "header": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "device": env.get("gpu") or f"CPU: {env.get('cpu', platform.processor())}",
                   "torch": env.get("torch", "?"), "python": platform.python_version(),
                   "command": "benchmarks/gpu_suite.sh " + " ".join(argv)},
        "config": settings["config"], "budgets": {n: budgets[n] for n in order}, "parts": results,
    }
    write_atomic(args.out / f"{stem}.json", json.dumps(report, indent=1, default=str))
    try:
        md = markdown(report)
    except Exception as e:  # a report with figures the table code does not expect: the JSON holds them
        md = f"# dinokit GPU suite\n\nThe Markdown report broke ({type(e).__name__}: {e}); see {stem}.json."
    write_atomic(args.out / f"{stem}.md", md + "\n")
    print(md)
    print(f"written: {args.out / (stem + '.json')}, {args.out / (stem + '.md')}, {args.out / (stem + '.log')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
