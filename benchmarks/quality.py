"""Learning quality at one equal budget: dinokit's methods and every peer's, method by method.

Trains DINO, DINOv2, DINOv3 (without and with Gram anchoring from mid-run) and iBOT alone (when
``model.method=ibot`` exists), each from its dinokit preset, with the same backbone (the ``demo``
preset's tiny ViT; plus DINO on resnet10t, the README's main job ``demo_cnn``), data
(Fashion-MNIST, else digits), crops, epochs and batch, over N seeds; and the peers' DINO, DINOv2
and DINOv3 (``PEERS``: lightly's DINO and DINOv2 parts, stable-pretraining's modules, nidl's
estimator) on the same backbone, data, crops, batch, steps, prototypes and recipe, each in its own
venv (``peer_quality.py`` in ``.bench-venv-<lib>``, made by ``setup_peers.sh``), which exports the
teacher's features of the evaluation images. Every run is a subprocess. Each trained teacher is
scored here with the same code: k-NN top-1 (k=20) and
a linear probe (learning rate chosen on a held-out part of the bank), next to the random-init
backbone and raw pixels; with the final loss and collapse diagnostics (teacher entropy, KL of the
mean teacher distribution to uniform, feature spread and effective rank).

    .venv/bin/python benchmarks/quality.py                     # full: demo budget, 3 seeds (3-4 h)
    .venv/bin/python benchmarks/quality.py --quick             # 64 steps a run, 1 seed (~5 min)
    .venv/bin/python benchmarks/quality.py --quick --steps 5 --md /tmp/B.md --out /tmp/q.json  # smoke
    .venv/bin/python benchmarks/quality.py --quick --seeds 3 --runs DINO DINOv2 DINOv3 <peers> --tables peers

Writes ``benchmarks/results/quality_<full|quick>.json`` and regenerates the matching table in
``BENCHMARKS.md`` (between ``<!-- quality-<mode>:begin -->`` and ``<!-- quality-<mode>:end -->``);
with peer rows also the per-method peer table (``quality-peers-<mode>`` markers) and its k-NN
chart ``benchmarks/results/quality_peers_<mode>.png`` (``--tables`` picks which). Each finished
(run, seed) is kept as JSON under ``--rows`` (default ``runs/quality-rows-<mode>``): a killed
benchmark started again skips them. Runs are step-count based and seeded: a busy machine slows
them but does not change their numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dinokit.atomic import atomic_path, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this script
from common import demo_data, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: run name -> (dinokit preset, overrides on top of the common budget). ``{gram_start}`` is half
#: the run's steps (Gram anchoring from mid-run, as the DINOv3 paper's late Gram stage). The DINOv3
#: rows leave out the preset's high-resolution stage (``stages=[]``): every row trains at one
#: resolution here, and ``benchmarks/dense.py`` measures that stage.
RUNS: dict[str, tuple[str, list[str]]] = {
    "DINO": ("demo", []),
    "DINOv2": ("dinov2_tiny_cpu", []),
    "DINOv3": ("dinov3_tiny_cpu", ["gram.weight=0", "stages=[]"]),
    "DINOv3 + Gram": ("dinov3_tiny_cpu", ["gram.weight=1.0", "gram.start_step={gram_start}",
                                          "gram.refresh_every={gram_refresh}", "stages=[]"]),
    "iBOT": ("dinov2_tiny_cpu", ["model.method=ibot"]),
    # The README's main job: DINO on timm's resnet10t (its own milder crops), same budget otherwise.
    "DINO resnet10t (demo_cnn)": ("demo_cnn", []),
}
#: peer row -> (library's venv suffix, ``peer_quality.py`` peer, the dinokit run whose preset and
#: budget it shares). Each library lives in ``.bench-venv-<lib>`` (``benchmarks/setup_peers.sh``).
PEERS: dict[str, tuple[str, str, str]] = {
    "lightly DINO parts": ("lightly", "lightly-dino", "DINO"),
    "nidl DINO": ("nidl", "nidl-dino", "DINO"),
    "stable-pretraining DINO": ("spt", "spt-dino", "DINO"),
    "lightly DINOv2 parts": ("lightly", "lightly-dinov2", "DINOv2"),
    "stable-pretraining DINOv2": ("spt", "spt-dinov2", "DINOv2"),
    "stable-pretraining DINOv3": ("spt", "spt-dinov3", "DINOv3"),
}
#: controlled trials on a peer (one difference from its row at a time); not in the default runs.
PEER_TRIALS: dict[str, tuple[str, str, str]] = {
    "lightly DINOv2 parts, timm ViT init": ("lightly", "lightly-dinov2-timm-init", "DINOv2"),
}
ALL_PEERS = {**PEERS, **PEER_TRIALS}
#: what each peer row takes from its own library where the recipe leaves the choice to it; every
#: other choice is dinokit's resolved preset (``peer_recipe``) and training loop (``peer_quality.py``).
PEER_OWN: dict[str, str] = {
    "lightly DINO parts": "its DINOProjectionHead init, DINOLoss; one backbone call per crop (its example)",
    "nidl DINO": "its DINOProjectionHead and DINOLoss; teacher temperature from its per-epoch table",
    "stable-pretraining DINO": "its head (L2-normalised bottleneck, plain prototypes), DINOv1Loss",
    "lightly DINOv2 parts": "EMA centring (no Sinkhorn-Knopp in lightly), its heads' and ViT's init, "
                            "random_block_mask",
    "stable-pretraining DINOv2": "its heads (no weight norm), random masks at its mask_ratio 0.3 on every "
                                 "global crop, no KoLeo",
    "stable-pretraining DINOv3": "its heads (no weight norm), random masks at 0.3, its own register tokens, "
                                 "KoLeo on the first global crop only",
    "lightly DINOv2 parts, timm ViT init": "as lightly DINOv2 parts, but timm's ViT init (dinokit's)",
}
BUDGETS = {  # images, batch, epochs, local crops, k-NN bank, test images, linear-probe epochs
    "full": {"limit": 12000, "batch": 64, "epochs": 10, "n_local": 4, "bank": 10000, "test": 2000,
             "probe_epochs": 100, "seeds": 3},
    # --quick: a smoke-level pass in a few minutes on 2 cores (some 30 s of training per run). 64
    # steps is too short for any method to move far from its random init: the full mode ranks them.
    "quick": {"limit": 1024, "batch": 64, "epochs": 4, "n_local": 2, "bank": 2000, "test": 500,
              "probe_epochs": 20, "seeds": 1},
}
PROBE_LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
K = 20


# ------------------------------------------------------------------------------- configuration
def budget_overrides(b: dict[str, Any], seed: int, out_dir: str, run_name: str, device: str) -> list[str]:
    """The keys every run shares: data, crops, batch, epochs, steps, seed."""
    return [
        "data.dataset=demo", f"data.limit={b['limit']}", f"data.val_limit={b['test']}",
        f"data.batch_size={b['batch']}", f"crops.n_local={b['n_local']}", "data.num_workers=0",
        f"trainer.epochs={b['epochs']}", f"trainer.max_steps={b['steps']}", f"trainer.seed={seed}",
        f"trainer.output_dir={out_dir}", f"trainer.run_name={run_name}", "trainer.progress=false",
        f"trainer.accelerator={device}", "trainer.devices=1", "trainer.knn_every_n_epochs=0",
        f"trainer.log_every_n_steps={max(1, min(10, b['total_steps'] // 5))}",
    ]


def total_steps(b: dict[str, Any]) -> int:
    per_epoch = b["limit"] // b["batch"]  # the loader drops the ragged tail
    n = per_epoch * b["epochs"]
    return min(n, b["steps"]) if b["steps"] > 0 else n


def run_overrides(name: str, b: dict[str, Any]) -> tuple[str, list[str]]:
    preset, extra = RUNS[name]
    steps = b["total_steps"]
    fmt = {"gram_start": steps // 2, "gram_refresh": max(1, steps // 4)}
    return preset, [e.format(**fmt) for e in extra]


# ------------------------------------------------------------------------------- evaluation
def eval_loaders(cfg: Any, bank: int, test: int) -> tuple[Any, Any]:
    """The k-NN bank (training split) and the test split, in the run's one preprocessing."""
    import copy

    from torch.utils.data import DataLoader

    from dinokit.train.build import build_dataset, build_preprocessing

    tf = build_preprocessing(cfg).eval_transform()
    bank_cfg, test_cfg = copy.deepcopy(cfg), copy.deepcopy(cfg)
    bank_cfg.data.limit, test_cfg.data.val_limit = bank, test
    return (DataLoader(build_dataset(bank_cfg, "train", transform=tf), batch_size=256),
            DataLoader(build_dataset(test_cfg, "val", transform=tf), batch_size=256))


def pixels(loader: Any) -> tuple[Any, Any]:
    import torch

    xs, ys = zip(*[(x.flatten(1), y) for x, y in loader], strict=True)
    return torch.cat(xs), torch.cat(ys)


def score(f_bank: Any, y_bank: Any, f_test: Any, y_test: Any, probe_epochs: int, seed: int) -> dict[str, Any]:
    """k-NN top-1 (k=20) and linear-probe top-1 (lr chosen on the last fifth of the bank)."""
    import torch

    from dinokit.eval.knn import knn_evaluate
    from dinokit.eval.linear import linear_probe

    knn = knn_evaluate(f_bank, y_bank, f_test, y_test, ks=(K,))[K]["top1"]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(f_bank), generator=g)
    cut = len(order) * 4 // 5
    tr, va = order[:cut], order[cut:]
    pick = linear_probe(f_bank[tr], y_bank[tr], f_bank[va], y_bank[va], lrs=PROBE_LRS, epochs=probe_epochs,
                        seed=seed, progress=False)
    final = linear_probe(f_bank, y_bank, f_test, y_test, lrs=(pick.best_lr,), epochs=probe_epochs,
                         seed=seed, progress=False)
    edge = pick.best_lr in (PROBE_LRS[0], PROBE_LRS[-1])
    return {"knn_top1": knn, "linear_top1": final.top1, "linear_lr": pick.best_lr, "linear_lr_at_edge": edge}


def feature_diagnostics(f: Any) -> dict[str, float]:
    """Collapse signs in the test features: mean per-dimension std of the L2-normalised features
    (DINO's collapse monitor; ~0 = one point) and the effective rank (exp of the entropy of the
    normalised singular values; 1 = a line)."""
    import torch

    z = torch.nn.functional.normalize(f.double(), dim=1)
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum().clamp_min(1e-12)
    erank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
    return {"feature_std": float(z.std(0).mean()), "effective_rank": erank}


def log_diagnostics(run_dir: Path) -> dict[str, float | None]:
    from dinokit.viz.curves import read_metrics

    try:
        m = read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return {}
    tail = [v for _, v in m.get("train/loss", [])[-10:]]
    last = {k: (m[f"train/{k}"][-1][1] if m.get(f"train/{k}") else None)
            for k in ("teacher_entropy", "teacher_kl_uniform")}
    return {"final_loss": sum(tail) / len(tail) if tail else None, **last}


def pooled_probe(method: Any, bank: Any, test: Any, a: dict[str, Any]) -> dict[str, Any]:
    """The linear probe on the CLS token and the mean patch token side by side: the input of the
    official DINOv2 linear evaluation's ``use_avgpool`` classifiers (``create_linear_input``)."""
    from dinokit.eval.features import extract_features

    fb, yb = extract_features(method, bank, kind="cls+avgpool", progress=False)
    ft, yt = extract_features(method, test, kind="cls+avgpool", progress=False)
    r = score(fb, yb, ft, yt, a["probe_epochs"], a["seed"])
    return {"linear_cls_avgpool_top1": r["linear_top1"], "linear_cls_avgpool_lr": r["linear_lr"]}


# ------------------------------------------------------------------------------- workers
def worker_train(a: dict[str, Any]) -> dict[str, Any]:
    """One dinokit run: train, then score the teacher."""
    import torch

    from dinokit.config import load_config
    from dinokit.eval.features import extract_features
    from dinokit.train.fit import fit

    torch.set_num_threads(a["threads"])
    cfg = load_config(a["preset"], a["overrides"])
    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    method = result.method.cpu().eval()
    bank, test = eval_loaders(cfg, a["bank"], a["test"])
    f_bank, y_bank = extract_features(method, bank, progress=False)
    f_test, y_test = extract_features(method, test, progress=False)
    out = score(f_bank, y_bank, f_test, y_test, a["probe_epochs"], a["seed"])
    out.update(pooled_probe(method, bank, test, a))
    out.update(feature_diagnostics(f_test))
    out.update(log_diagnostics(result.run_dir))
    out.update({"train_wall_s": wall, "train_cpu_s": cpu, "steps": int(result.trainer.global_step),
                "n_prototypes": cfg.dino.n_prototypes})
    return out


def worker_baselines(a: dict[str, Any]) -> dict[str, Any]:
    """The DINO preset's backbone at random init (this seed), and raw pixels."""
    import torch

    from dinokit.config import load_config
    from dinokit.eval.features import extract_features
    from dinokit.train.build import build_method

    torch.set_num_threads(a["threads"])
    cfg = load_config(a["preset"], a["overrides"])
    torch.manual_seed(a["seed"])
    method = build_method(cfg).eval()
    bank, test = eval_loaders(cfg, a["bank"], a["test"])
    f_bank, y_bank = extract_features(method, bank, progress=False)
    f_test, y_test = extract_features(method, test, progress=False)
    out = {"random init": {**score(f_bank, y_bank, f_test, y_test, a["probe_epochs"], a["seed"]),
                           **pooled_probe(method, bank, test, a), **feature_diagnostics(f_test)}}
    if a["pixels"]:
        x_bank, y_bank = pixels(bank)
        x_test, y_test = pixels(test)
        out["raw pixels"] = score(x_bank, y_bank, x_test, y_test, a["probe_epochs"], a["seed"])
    return out


def peer_recipe(cfg: Any) -> dict[str, Any]:
    """The recipe a peer is built with: dinokit's config ``cfg`` with every official (``None`` /
    ``auto``) choice of its method resolved, in the plain types ``peer_quality.py`` reads."""
    import dinokit.methods  # noqa: F401  (registers the methods)
    from dinokit.methods.registry import method_spec, official_rules, resolve_settings
    from dinokit.settings import MethodSettings
    from dinokit.train.build import build_multicrop_config
    from dinokit.train.step import resolve_rules

    s = resolve_settings(method_spec(cfg.model.method), MethodSettings.from_config(cfg))
    o = resolve_rules(cfg.optim, official_rules(cfg.model.method))
    if (o.layer_decay, o.patch_embed_lr_mult) != (1.0, 1.0):
        raise SystemExit(f"{cfg.model.method}: the peers' training loop has no layer-wise learning-rate decay; "
                         "run the peer rows with optim.layer_decay=1 optim.patch_embed_lr_mult=1")
    b, h, t = s.backbone, s.heads, s.teacher
    return {
        "method": cfg.model.method, "backbone": b.name, "backbone_kwargs": dict(b.kwargs),
        "n_registers": int(b.n_registers or 0), "hidden": h.hidden_dim, "bottleneck": h.bottleneck_dim,
        "batch_norm": h.batch_norm, "norm_last_layer": bool(h.norm_last_layer), "weight_norm": bool(h.weight_norm),
        "prototypes": s.dino.n_prototypes, "dino_weight": s.dino.weight, "student_temp": s.dino.student_temperature,
        "warmup_teacher_temp": t.warmup_temperature, "teacher_temp": t.temperature,
        "warmup_teacher_temp_epochs": t.warmup_epochs, "centering": t.centering,
        "center_momentum": t.center_momentum, "ema_start": t.momentum, "ema_end": t.final_momentum,
        "ibot_weight": s.ibot.weight, "ibot_prototypes": s.ibot.n_prototypes,
        "ibot_shared_head": bool(s.ibot.shared_head), "ibot_student_temp": s.ibot.student_temperature,
        "mask_probability": s.ibot.mask_probability, "mask_ratio_range": list(s.ibot.mask_ratio_range),
        "mask_mode": s.ibot.mask_mode, "koleo_weight": s.koleo.weight if cfg.model.method != "dino" else 0.0,
        "lr": o.lr, "lr_reference_batch": o.lr_reference_batch, "lr_scaling": o.lr_scaling,
        "min_lr": o.min_lr, "warmup_epochs": o.warmup_epochs, "weight_decay": o.weight_decay,
        "weight_decay_end": o.weight_decay_end, "betas": list(o.betas), "clip_grad": o.clip_grad,
        "clip_mode": o.clip_mode,
        "freeze_last_layer_epochs": o.freeze_last_layer_epochs, "batch": cfg.data.batch_size,
        "epochs": cfg.trainer.epochs, "max_steps": cfg.trainer.max_steps, "seed": cfg.trainer.seed,
        "crops": build_multicrop_config(cfg).to_dict(),
    }


def worker_peer_data(a: dict[str, Any]) -> dict[str, Any]:
    """What a peer needs from dinokit's side, written to ``a['path']``: the training images
    (uint8), each epoch's sample order and per-sample augmentation seeds (dinokit's loader's), the
    recipe (:func:`peer_recipe`) and the evaluation images preprocessed with their labels."""
    import numpy as np
    import torch

    from dinokit.config import load_config
    from dinokit.seeding import sample_seed
    from dinokit.train.build import build_dataset
    from dinokit.train.loader import EpochSampler

    cfg = load_config(a["preset"], a["overrides"])
    ds = build_dataset(cfg, "train")  # what dinokit's training loader reads (PIL images)
    images = torch.stack([torch.as_tensor(np.asarray(ds[i][0])) for i in range(len(ds))])
    if images.ndim == 3:
        images = images[:, None]
    n, seed, epochs = len(ds), cfg.trainer.seed, cfg.trainer.epochs
    sampler = EpochSampler(n, seed=seed)
    order = []
    for e in range(epochs):
        sampler.set_epoch(e)
        order.append(torch.tensor([int(k) - e * n for k in sampler]))
    seeds = torch.tensor([[sample_seed(seed, e, i) for i in range(n)] for e in range(epochs)], dtype=torch.int64)
    bank, test = eval_loaders(cfg, a["bank"], a["test"])
    (xb, yb), (xt, yt) = [tuple(torch.cat(t) for t in zip(*loader, strict=True)) for loader in (bank, test)]
    blob = {"images": images, "order": torch.stack(order), "seeds": seeds, "recipe": peer_recipe(cfg),
            "bank": xb, "test": xt, "bank_labels": yb, "test_labels": yt}
    with atomic_path(a["path"]) as tmp:
        torch.save(blob, tmp)
    return {"images": n}


def worker_peer_eval(a: dict[str, Any]) -> dict[str, Any]:
    """Score the teacher features a peer exported with dinokit's evaluation."""
    import torch

    torch.set_num_threads(a["threads"])
    f = torch.load(a["features"], map_location="cpu", weights_only=True)
    blob = torch.load(a["data"], map_location="cpu", weights_only=True)
    return {**score(f["bank"], blob["bank_labels"], f["test"], blob["test_labels"], a["probe_epochs"], a["seed"]),
            **feature_diagnostics(f["test"])}


WORKERS = {"train": worker_train, "baselines": worker_baselines, "peer_data": worker_peer_data,
           "peer_eval": worker_peer_eval}


# ------------------------------------------------------------------------------- the parent
CHILD_CPU: list[float] = []  # CPU seconds of every child, for the report


def run_child(cmd: list[str], threads: int, timeout: float | None = None) -> tuple[dict[str, Any] | None, str, float]:
    """Run a child; its last stdout line ``RESULT {json}`` is the answer. Returns (result, log tail,
    CPU seconds of the child)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        text, ok = proc.stdout + proc.stderr, proc.returncode == 0
    except subprocess.TimeoutExpired as e:
        text, ok = f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}", False
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    CHILD_CPU.append(cpu)
    lines = [ln for ln in (text or "").splitlines() if ln.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):]) if ok and lines else None
    return result, "\n".join((text or "").splitlines()[-15:]), cpu


def dinokit_child(kind: str, payload: dict[str, Any], threads: int) -> tuple[dict | None, str, float]:
    return run_child([sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(payload)],
                     threads)


def method_available(name: str) -> str | None:
    """None when ``model.method=name`` loads, else the reason."""
    from dinokit.config import load_config

    try:
        load_config("demo", [f"model.method={name}"]).validate()
    except Exception as e:  # any failure means "not available"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def aggregate(values: list[float | None]) -> dict[str, float | None]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v)}


METRICS = ("knn_top1", "linear_top1", "linear_cls_avgpool_top1", "final_loss", "teacher_entropy", "teacher_kl_uniform", "feature_std",
           "effective_rank", "train_wall_s", "train_cpu_s")


def versions(peer: dict[str, Any] | None) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("dinokit", "torch", "timm", "lightning", "torchvision", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "?"
    out["python"] = platform.python_version()
    for k, v in (peer or {}).items():
        out[f"peer {k}"] = v
    return out





def fmt(agg: dict[str, Any] | None, digits: int = 2) -> str:
    if not agg or agg.get("mean") is None:
        return "-"
    s = f"{agg['mean']:.{digits}f}"
    return s + (f" ± {agg['std']:.{digits}f}" if agg.get("std") is not None else "")


def markdown(report: dict[str, Any]) -> str:
    b = report["budget"]
    cap = "" if b["steps"] <= 0 else f", capped at {b['steps']} steps"
    lines = [
        f"Budget: {b['limit']} training images ({DATA_NAMES[b.get('data', 'fashion-mnist')]}), batch "
        f"{b['batch']}, {b['epochs']} epochs"
        f"{cap} ({b['total_steps']} steps), "
        f"2 global + {b['n_local']} local crops, the `demo` preset's tiny ViT"
        f"{' (resnet10t in its row)' if any('resnet10t' in n for n in report['runs']) else ''}; "
        f"seeds {report['seeds']}; "
        f"k-NN (k={K}) bank {b['bank']} training images, {b['test']} test images. Mean ± std over seeds.",
        "",
        "| run | k-NN top-1 | linear top-1 | linear, CLS + mean patch | final loss | teacher entropy | "
        "KL(mean ‖ uniform) | feature std | eff. rank | train wall s | train CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["runs"].items():
        if r.get("skipped"):
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | | | | |")
            continue
        a = r["aggregate"]
        lines.append(f"| {name} | " + " | ".join(fmt(a.get(m), 3 if m in ("final_loss", "teacher_entropy",
                     "teacher_kl_uniform", "feature_std") else (1 if m.endswith("_s") else 2)) for m in METRICS)
                     + " |")
    edge = sorted({n for n, r in report["runs"].items() if any(s.get("linear_lr_at_edge")
                   for s in r.get("seeds", {}).values() if s)})
    lines += [
        "",
        f"Linear probe: SGD on standardised features, learning rate chosen from {list(PROBE_LRS)} on the "
        "last fifth of the bank, then retrained on the whole bank and scored on the test split"
        + (f"; the choice sat at the edge of the sweep for: {', '.join(edge)}." if edge else ".")
        + " Its input is the CLS token (DINO's protocol), or CLS and mean patch token concatenated "
        "(the official DINOv2 linear evaluation's avgpool classifiers).",
        "Collapse: entropy ≈ ln K and KL ≈ 0 with a feature std near 0 mean a collapsed teacher; "
        "eff. rank is exp(entropy of the singular values) of the normalised test features.",
        "",
        f"Machine: {report['machine']}; {report['threads']} threads per run; date {report['date']}; "
        f"whole benchmark {report['total_wall_s']:.0f} s wall, {report['total_cpu_s']:.0f} s CPU"
        f"{' (summed over ' + str(report['jobs']) + ' jobs, two at a time)' if report.get('jobs') else ''}. Train wall/CPU "
        "time: dinokit's `fit` (Lightning set-up and checkpoints included); lightly's training loop.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        f"Command: `{report['command']}`",
    ]
    if report.get("notes"):
        lines += ["", *[f"Note: {n}" for n in report["notes"]]]
    return "\n".join(lines)


#: how a table names the data its budget was run on
DATA_NAMES = {"fashion-mnist": "Fashion-MNIST", "digits": "scikit-learn's digits: Fashion-MNIST was missing"}
#: BENCHMARKS.md's heading of each table quality.py writes.
TITLES = {"full": "Learning quality (full)", "quick": "Learning quality (--quick)",
          "peers-full": "Learning quality against every peer (full)",
          "peers-quick": "Learning quality against every peer (--quick)"}


def merge_reports(paths: list[Path]) -> dict[str, Any]:
    """One report from jobs that split the seeds or runs of one budget (``--first-seed``,
    ``--runs``): their per-seed results side by side, aggregates recomputed, times summed."""
    reports = [json.loads(p.read_text()) for p in paths]
    for r in reports:  # reports written before the budget named its data were all on Fashion-MNIST
        r["budget"].setdefault("data", "fashion-mnist")
    first = reports[0]
    for r in reports[1:]:
        if r["budget"] != first["budget"] or r["mode"] != first["mode"]:
            raise SystemExit(f"cannot merge: {paths[0]} and another report have different budgets")
    runs: dict[str, Any] = {}
    for r in reports:
        for name, run in r["runs"].items():
            into = runs.setdefault(name, {k: v for k, v in run.items() if k not in ("seeds", "aggregate")})
            into.setdefault("seeds", {}).update(run.get("seeds", {}))
    order = [*RUNS, *ALL_PEERS, "random init (DINO backbone)", "raw pixels"]
    runs = dict(sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    for run in runs.values():
        if "seeds" in run:
            run["seeds"] = dict(sorted(run["seeds"].items(), key=lambda kv: int(kv[0])))
            run["aggregate"] = {m: aggregate([(v or {}).get(m) for v in run["seeds"].values()]) for m in METRICS}
    seeds = sorted({int(s) for run in runs.values() for s in run.get("seeds", {})})
    return {**first, "runs": runs, "seeds": seeds, "date": max(r["date"] for r in reports),
            "command": "` + `".join(r["command"] for r in reports),
            "total_wall_s": sum(r["total_wall_s"] for r in reports), "jobs": len(reports),
            "total_cpu_s": sum(r["total_cpu_s"] for r in reports),
            "notes": [n for r in reports for n in r.get("notes", [])]}


def slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def peer_python(lib: str) -> Path:
    """The python of a peer library's own venv."""
    return ROOT / f".bench-venv-{lib}" / "bin" / "python"


PEER_PACKAGES = {"lightly": "lightly", "spt": "stable-pretraining", "nidl": "nidl"}


def venv_versions(python: Path, packages: list[str]) -> dict[str, str]:
    """``packages``' versions as installed in the venv of ``python`` ("?" when absent)."""
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor p in sys.argv[1:]:\n    try:\n"
            "        out[p] = m.version(p)\n    except m.PackageNotFoundError:\n        out[p] = '?'\nprint(json.dumps(out))")
    proc = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {p: "?" for p in packages}


class RowCache:
    """One JSON per finished (run, seed) under ``folder``, tagged with the budget, so that a
    benchmark started again skips what a killed one finished."""

    def __init__(self, folder: Path | None, budget: dict[str, Any], extra: list[str]):
        self.folder, self.tag = folder, {"budget": budget, "set": extra}

    def _path(self, name: str, seed: int) -> Path | None:
        return None if self.folder is None else self.folder / f"{slug(name)}-s{seed}.json"

    def get(self, name: str, seed: int) -> dict[str, Any] | None:
        path = self._path(name, seed)
        if path is None or not path.is_file():
            return None
        row = json.loads(path.read_text())
        return row["result"] if row.get("tag") == self.tag else None

    def put(self, name: str, seed: int, result: dict[str, Any] | None) -> None:
        path = self._path(name, seed)
        if path is None or result is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"tag": self.tag, "result": result}))


def peer_markdown(report: dict[str, Any], png: str | None) -> str:
    """The per-method table: dinokit's row and every peer's for DINO, DINOv2 and DINOv3."""
    b = report["budget"]
    lines = [
        f"Budget: {b['limit']} training images ({DATA_NAMES[b.get('data', 'fashion-mnist')]}), batch "
        f"{b['batch']}, {b['total_steps']} steps, 2 global + "
        f"{b['n_local']} local crops, the `demo` preset's tiny ViT and each method's dinokit preset "
        f"(`{RUNS['DINO'][0]}`, `{RUNS['DINOv2'][0]}`, `{RUNS['DINOv3'][0]}` without Gram); seeds "
        f"{report['seeds']}; k-NN (k={K}) bank {b['bank']}, test {b['test']} images, CLS token of the "
        "teacher. Mean ± std over seeds.",
        "",
        "| method | library | seeds | k-NN top-1 | linear top-1 | final loss | feature std | eff. rank | "
        "train CPU s | the peer's own choices (the rest: dinokit's recipe) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for method in ("DINO", "DINOv2", "DINOv3"):
        rows = [(method, "dinokit", "-")] if method in report["runs"] else []
        rows += [(n, n.split(" ")[0] + (" (trial)" if n in PEER_TRIALS else ""), PEER_OWN[n])
                 for n, v in ALL_PEERS.items() if v[2] == method and n in report["runs"]]
        for name, lib, own in rows:
            r = report["runs"][name]
            if r.get("skipped"):
                lines.append(f"| {method} | {lib} | - | skipped: {r['skipped']} | | | | | | |")
                continue
            ag = r["aggregate"]
            seeds = ", ".join(sorted(r.get("seeds", {}), key=int))
            cells = [seeds] + [fmt(ag.get(m), 3 if m in ("final_loss", "feature_std") else (1 if m.endswith("_s") else 2))
                     for m in ("knn_top1", "linear_top1", "final_loss", "feature_std", "effective_rank",
                               "train_cpu_s")]
            lines.append(f"| {method} | {lib} | " + " | ".join(cells) + f" | {own} |")
    for name in ("random init (DINO backbone)", "raw pixels"):
        if name in report["runs"]:
            ag = report["runs"][name]["aggregate"]
            lines.append(f"| baseline | {name} | - | {fmt(ag.get('knn_top1'))} | {fmt(ag.get('linear_top1'))} "
                         "| - | - | - | - | |")
    lines += [
        "",
        "Every peer: the same images, crops (dinokit's multi-crop code under the same per-sample seeds and "
        "order), backbone, batch, steps, head widths, prototypes, temperatures, teacher momenta and "
        "training loop (AdamW, no decay on biases and 1-D tensors, LR warm-up + cosine, cosine weight "
        "decay, the method's official clipping) as the dinokit row; its features exported from its own "
        "venv and scored here by the same k-NN and linear probe "
        f"(learning rate chosen from {list(PROBE_LRS)} on the last fifth of the bank).",
        "Final loss and train CPU s compare within a library only: dinokit's loss is the mean of its last "
        "10 logged values and its CPU time includes Lightning's set-up; a peer's loss is the mean of its "
        "last 10 steps in the peer's own form of the loss, its CPU time the training loop alone.",
        f"Machine: {report['machine']}; {report['threads']} threads per run; date {report['date']}; "
        f"this start of the command {report['total_wall_s']:.0f} s wall, {report['total_cpu_s']:.0f} s CPU "
        "(rows kept from an earlier start of the same command are read back, not counted).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        f"Command: `{report['command']}`",
    ]
    if png:
        lines += ["", f"![k-NN per method and library]({png})"]
    if report.get("notes"):
        lines += ["", *[f"Note: {n}" for n in report["notes"]]]
    return "\n".join(lines)


def knn_chart(report: dict[str, Any], path: Path) -> bool:
    """k-NN top-1 per method and library (mean, std as error bar, each seed a dot) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = []
    for method in ("DINO", "DINOv2", "DINOv3"):
        names = ([method] if method in report["runs"] else []) + [
            n for n, v in ALL_PEERS.items() if v[2] == method and n in report["runs"]]
        groups.append((method, [n for n in names if report["runs"][n].get("seeds")]))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    x, ticks, labels = 0.0, [], []
    colours = {"dinokit": "tab:blue", "lightly": "tab:orange", "stable-pretraining": "tab:green",
               "nidl": "tab:red"}
    for method, names in groups:
        for n in names:
            lib = "dinokit" if n == method else n.split(" ")[0]
            vals = [v["knn_top1"] for v in report["runs"][n]["seeds"].values() if v]
            if not vals:
                continue
            mean = statistics.fmean(vals)
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.bar(x, mean, yerr=std, color=colours.get(lib, "grey"), capsize=3)
            ax.scatter([x] * len(vals), vals, color="black", s=8, zorder=3)
            ticks.append(x)
            labels.append(f"{method}\n{lib}" + (f"\n{n.split(', ')[-1]}" if n in PEER_TRIALS else ""))
            x += 1
        x += 0.6
    base = report["runs"].get("random init (DINO backbone)", {}).get("aggregate", {}).get("knn_top1")
    if base and base.get("mean") is not None:
        ax.axhline(base["mean"], color="grey", linestyle="--", linewidth=1, label="random init")
        ax.legend(loc="lower right")
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel(f"k-NN top-1 (k={K}), %")
    ax.set_title(f"k-NN per method and library, {report['budget']['total_steps']} steps, seeds {report['seeds']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def write_tables(report: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    mode = report["mode"]
    if "main" in args.tables:
        write_section(args.md, f"quality-{mode}", TITLES[mode], markdown(report))
    if "peers" in args.tables and any(n in report["runs"] for n in ALL_PEERS):
        png = out.parent / f"quality_peers_{mode}.png"
        rel = os.path.relpath(png, args.md.parent) if knn_chart(report, png) else None
        write_section(args.md, f"quality-peers-{mode}", TITLES[f"peers-{mode}"], peer_markdown(report, rel))


def main(argv: list[str] | None = None) -> int:
    choices = [*RUNS, *ALL_PEERS]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget, 1 seed (a few minutes on 2 cores)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 3, --quick 1)")
    p.add_argument("--steps", type=int, default=-1, help="cap every run at this many steps (-1 = epochs)")
    p.add_argument("--epochs", type=int, help="override the budget's epochs")
    p.add_argument("--limit", type=int, help="override the budget's training images")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every dinokit run (recipe trials)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds start here (to split seeds over jobs)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the random-init and raw-pixel rows (a job whose seeds another job covers)")
    p.add_argument("--runs", nargs="*", default=[*RUNS, *PEERS],
                   help=f"subset of {choices} (default: all but the trials {list(PEER_TRIALS)})")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/quality_<mode>.json)")
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file to update")
    p.add_argument("--tables", nargs="+", choices=("main", "peers"), default=["main", "peers"],
                   help="which tables of --md to write: the mode's main table, the per-method peer table")
    p.add_argument("--rows", type=Path, help="keep each finished (run, seed) here and skip it when started "
                   "again (default runs/quality-rows-<mode>; 'none' = off)")
    p.add_argument("--keep-runs", type=Path, help="keep run directories here (default: a temporary folder)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="merge the reports of jobs run in parallel (split seeds/runs) into --out and --md")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        kind, payload = args.worker
        print("RESULT " + json.dumps(WORKERS[kind](json.loads(payload))), flush=True)
        return 0

    if args.merge:
        report = merge_reports(args.merge)
        out = args.out or RESULTS / f"quality_{report['mode']}.json"
        write_text(out, json.dumps(report, indent=2))
        write_tables(report, args, out)
        print(f"wrote {out} and the tables {args.tables} of {args.md}")
        return 0

    mode = "quick" if args.quick else "full"
    b = dict(BUDGETS[mode])
    b.update({k: v for k, v in (("epochs", args.epochs), ("limit", args.limit)) if v is not None})
    b["steps"] = args.steps
    b["total_steps"] = total_steps(b)
    b["data"] = demo_data(strict=not args.quick, what="quality.py")  # rows and merges never mix the two
    n_seeds = args.seeds if args.seeds is not None else b.pop("seeds")
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    b.pop("seeds", None)
    unknown = sorted(set(args.runs) - set(choices))
    if unknown:
        p.error(f"unknown runs {unknown}; choose from {choices}")
    rows_dir = None if str(args.rows) == "none" else (args.rows or ROOT / "runs" / f"quality-rows-{mode}")
    cache = RowCache(rows_dir, b, list(args.set))
    t_start = time.perf_counter()
    notes: list[str] = []
    report: dict[str, Any] = {"mode": mode, "budget": b, "seeds": seeds, "threads": args.threads,
                              "command": "python " + shlex.join(["benchmarks/quality.py", *(argv or sys.argv[1:])]),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}
    tmp = tempfile.TemporaryDirectory(prefix="dinokit-quality-")
    out_dir = str(args.keep_runs or tmp.name)
    common = {"threads": args.threads, "bank": b["bank"], "test": b["test"], "probe_epochs": b["probe_epochs"]}

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    for name in [n for n in RUNS if n in args.runs]:
        preset, extra = run_overrides(name, b)
        extra = extra + list(args.set)
        if name == "iBOT" and (why := method_available("ibot")):
            report["runs"][name] = {"skipped": "model.method=ibot is not available yet"}
            notes.append(f"iBOT skipped: model.method=ibot does not load ({why}).")
            say(f"{name}: skipped ({why})")
            continue
        per_seed: dict[str, Any] = {}
        for seed in seeds:
            if (res := cache.get(name, seed)) is None:
                ov = budget_overrides(b, seed, out_dir, f"{slug(name)}-s{seed}", args.device) + extra
                say(f"{name} seed {seed}: training ({preset} {' '.join(extra)})")
                res, log, _ = dinokit_child("train", {**common, "preset": preset, "overrides": ov, "seed": seed},
                                            args.threads)
                if res is None:
                    notes.append(f"{name} seed {seed} failed: {log.splitlines()[-1] if log else '?'}")
                    say(f"{name} seed {seed}: FAILED\n{log}")
                cache.put(name, seed, res)
            per_seed[str(seed)] = res
        report["runs"][name] = {"preset": preset, "overrides": extra, "seeds": per_seed}

    peer_versions: dict[str, dict[str, str]] = {}
    peer_data: dict[tuple[str, int], Path] = {}  # (dinokit run, seed) -> the data file peers share
    for name in [n for n in ALL_PEERS if n in args.runs]:
        lib, peer, run = ALL_PEERS[name]
        python = peer_python(lib)
        if not python.is_file():
            report["runs"][name] = {"skipped": f"no .bench-venv-{lib}"}
            notes.append(f"{name} skipped: .bench-venv-{lib} does not exist; run bash benchmarks/setup_peers.sh {lib}.")
            say(f"{name}: skipped (no .bench-venv-{lib})")
            continue
        preset, extra = run_overrides(run, b)
        if lib not in peer_versions:
            peer_versions[lib] = venv_versions(python, [PEER_PACKAGES[lib], "torch", "timm"])
        per_seed = {}
        for seed in seeds:
            if (res := cache.get(name, seed)) is not None:
                per_seed[str(seed)] = res
                continue
            ov = budget_overrides(b, seed, out_dir, f"{slug(name)}-s{seed}", args.device) + extra
            data = peer_data.get((run, seed))
            log = ""
            if data is None:
                data = Path(out_dir) / f"peer-data-{slug(run)}-s{seed}.pt"
                prep, log, _ = dinokit_child("peer_data", {**common, "preset": preset, "overrides": ov,
                                                           "path": str(data)}, args.threads)
                if prep is not None:
                    peer_data[(run, seed)] = data
            res = None
            if (run, seed) in peer_data:
                features = Path(out_dir) / f"features-{slug(name)}-s{seed}.pt"
                say(f"{name} seed {seed}: training in .bench-venv-{lib}")
                res, log, _ = run_child([str(python), str(ROOT / "benchmarks" / "peer_quality.py"),
                                         json.dumps({"peer": peer, "data": str(data), "features": str(features),
                                                     "threads": args.threads, "device": args.device})],
                                        args.threads)
                if res is not None:
                    scored, log, _ = dinokit_child("peer_eval", {**common, "data": str(data), "seed": seed,
                                                                 "features": str(features)}, args.threads)
                    res = {**res, **scored} if scored is not None else None
            if res is None:
                notes.append(f"{name} seed {seed} failed: {log.splitlines()[-1] if log else '?'}")
                say(f"{name} seed {seed}: FAILED\n{log}")
            cache.put(name, seed, res)
            per_seed[str(seed)] = res
        report["runs"][name] = {"library": lib, "recipe_of": run, "preset": preset, "seeds": per_seed}

    dino_preset, _ = RUNS["DINO"]
    base: dict[str, dict[str, Any]] = {"random init": {}, "raw pixels": {}}
    if not args.no_baselines:
        say("baselines: random init and raw pixels")
    for seed in [] if args.no_baselines else seeds:
        if (res := cache.get("baselines", seed)) is None:
            ov = budget_overrides(b, seed, out_dir, f"baseline-s{seed}", args.device)
            res, log, _ = dinokit_child("baselines", {**common, "preset": dino_preset, "overrides": ov, "seed": seed,
                                                      "pixels": seed == seeds[0]}, args.threads)
            if res is None:
                notes.append(f"baselines seed {seed} failed: {log.splitlines()[-1] if log else '?'}")
                continue
            cache.put("baselines", seed, res)
        for k, v in res.items():
            base[k][str(seed)] = v
    for k, v in base.items():
        if v:
            report["runs"][f"{k} (DINO backbone)" if k == "random init" else k] = {"seeds": v}

    for r in report["runs"].values():
        if "seeds" in r:
            r["aggregate"] = {m: aggregate([(s or {}).get(m) for s in r["seeds"].values()]) for m in METRICS}
    flat = {(k if k not in ("torch", "timm") else f"{lib} venv {k}"): v
            for lib, vs in peer_versions.items() for k, v in vs.items()}
    report.update({"notes": notes, "machine": machine(), "versions": versions(flat),
                   "total_wall_s": time.perf_counter() - t_start, "total_cpu_s": sum(CHILD_CPU)})
    out = args.out or RESULTS / f"quality_{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(report, indent=2))
    write_tables(report, args, out)
    print(markdown(report))
    say(f"wrote {out} and the tables {args.tables} of {args.md}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
