"""Dense features at a small CPU budget: the segmentation probe on the scene task beside k-NN / linear.

Trains DINO, DINOv2, DINOv3 without Gram anchoring, DINOv3 with Gram anchoring (from mid-run) and
DINOv3 with Gram anchoring and the high-resolution stage (the ``dinov3_tiny_cpu`` preset's last
fifth at 56 px global crops), each from its dinokit preset with the same tiny ViT (patch 4, depth
3, width 64), on the ``scenes`` data (56 px scenes of 2-3 Fashion-MNIST items; the base crops are
28 px global, 12 px local). Each row is one ``dinokit train`` subprocess; its checkpoints are scored
here with the same code:

- mIoU / pixel accuracy of the linear segmentation probe (:mod:`dinokit.eval.segmentation`) on the
  held-out scenes, at 56 px (twice the base training crops) and at 28 px;
- k-NN (k=20) and linear-probe top-1 on ``scene-items`` (one item per 56 px scene, random position
  and scale), next to the random-init backbone and raw pixels (4x4 pixel patches for the probe);
- the probe's ceiling on the task: each patch's class fractions, read from the masks, as its
  features ("patch labels").

Three tiers of rows: short (150 steps, 3 seeds), long (600 steps, seed 0: DINOv3 with and without
Gram anchoring) and the demo budget (1,870 steps, every method; seed 0 unless ``--demo-seeds``
names more).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/dense.py            # every row (about 3 h of one CPU core)
    .venv/bin/python benchmarks/dense.py --tiers short long                       # without the demo-budget rows (40 min)
    .venv/bin/python benchmarks/dense.py --only "DINO" --seeds 0                 # one row
    .venv/bin/python benchmarks/dense.py --tiers demo --seeds 1 2 --demo-seeds 1 2 \
        --only DINO DINOv2 DINOv3                                                 # demo-budget spread
    .venv/bin/python benchmarks/dense.py --report                                # table + curves only

Each row writes ``benchmarks/results/dense/<row>.json`` and is skipped when that file exists (a
killed run loses one row). ``--report`` writes ``benchmarks/results/dense_miou.png`` (mIoU over
training steps) and the table between ``<!-- dense:begin -->`` and ``<!-- dense:end -->`` in
BENCHMARKS.md. Runs are step-count based and seeded: a busy machine slows them, their numbers stay.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dinokit import atomic
from dinokit.cli._common import load
from dinokit.config import load_config
from dinokit.data.scenes import scene_dataset
from dinokit.demo import linear_top1
from dinokit.eval.features import extract_features
from dinokit.eval.knn import knn_evaluate
from dinokit.eval.segmentation import (
    PROBE_LRS,
    DenseView,
    extract_patch_features,
    segmentation_probe,
)
from dinokit.train.build import build_method, build_preprocessing
from dinokit.train.fit import load_run_config
from dinokit.viz._figure import new_figure, save

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this script
from common import demo_data, write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROWS_DIR = RESULTS / "dense"
WORK = ROOT / "runs" / "bench-dense"

#: row name -> (preset, overrides). ``{half}``/``{quarter}``: half / a quarter of the run's steps.
METHODS: dict[str, tuple[str, list[str]]] = {
    "DINO": ("demo", []),
    "DINOv2": ("dinov2_tiny_cpu", []),
    "DINOv3": ("dinov3_tiny_cpu", ["gram.weight=0", "stages=[]"]),
    "DINOv3 + Gram": ("dinov3_tiny_cpu", ["gram.weight=1.0", "gram.start_step={half}",
                                          "gram.refresh_every={quarter}", "stages=[]"]),
    "DINOv3 + Gram + high-res": ("dinov3_tiny_cpu", ["gram.weight=1.0", "gram.start_step={half}",
                                                     "gram.refresh_every={quarter}"]),
}
#: The budget: steps of a short row (3 seeds), of a long row (1 seed, the Gram question) and of a
#: row at the demo budget (1 seed, every method: the ``demo`` preset's 1,870 steps), the checkpoint
#: interval of their curves, scenes for training / the probe, items for k-NN.
BUDGET = {"short_steps": 150, "long_steps": 600, "demo_steps": 1870, "short_every": 50, "long_every": 100,
          "demo_every": 374,
          "train_scenes": 4000, "seg_train": 500, "seg_test": 300, "knn_bank": 1000, "knn_test": 500,
          "probe_epochs": 10, "probe_lrs": list(PROBE_LRS), "linear_epochs": 20, "batch": 64, "n_local": 4}
LONG = ("DINOv3", "DINOv3 + Gram")
#: The row tiers: the short rows, the long rows, the rows at the demo budget; their file suffix and label.
TIERS = {"short": ("", ""), "long": ("_long", " (long)"), "demo": ("_demo", " (demo budget)")}
BASE_SIZE, HIGH_SIZE = 28, 56
K = 20
TRAIN = "import sys; from dinokit.cli import main; sys.exit(main(sys.argv[1:]))"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def overrides(method: str, seed: int, steps: int, every: int, run_dir: Path) -> tuple[str, list[str]]:
    preset, extra = METHODS[method]
    b = BUDGET
    common = [
        "data.dataset=scenes", f"data.limit={b['train_scenes']}", "crops.source_size=56",
        f"crops.global_size={BASE_SIZE}", "crops.local_size=12", f"crops.n_local={b['n_local']}",
        f"data.batch_size={b['batch']}", "data.num_workers=0", "trainer.epochs=1000",
        f"trainer.max_steps={steps}", f"trainer.seed={seed}", f"trainer.output_dir={run_dir.parent}",
        f"trainer.run_name={run_dir.name}", "trainer.progress=false", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.knn_every_n_epochs=0", "trainer.log_every_n_steps=10",
        f"trainer.checkpoint_every_n_steps={every}", "trainer.keep_checkpoints=-1",
    ]
    return preset, common + [e.format(half=steps // 2, quarter=max(1, steps // 4)) for e in extra]


# ------------------------------------------------------------------------------- evaluation
def _patch_pixels(images: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """Raw pixels of each ``patch x patch`` cell as its feature: ``[B, C * patch**2, h, w]``."""
    b, c, h, w = images.shape
    cells = torch.nn.functional.unfold(images, patch, stride=patch)
    return cells.reshape(b, c * patch * patch, h // patch, w // patch)


def _pixel_features(ds: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    xs, ms = zip(*[ds[i] for i in range(len(ds))], strict=True)
    return _patch_pixels(torch.stack(xs)), list(ms)


def _patch_labels(masks: torch.Tensor, n_classes: int, grid: int) -> torch.Tensor:
    """The class fractions of each cell of a ``grid x grid`` patch grid over the masks, ``[B,
    n_classes, grid, grid]``: the patch features of a backbone that knew every pixel's class, the
    most a patch grid can tell the linear head."""
    onehot = torch.nn.functional.one_hot(masks.long(), n_classes).permute(0, 3, 1, 2).float()
    return torch.nn.functional.adaptive_avg_pool2d(onehot, grid)


def _label_features(ds: Any, n_classes: int, grid: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ms = [ds[i][1] for i in range(len(ds))]
    return _patch_labels(torch.stack(ms), n_classes, grid), ms


def seg_scores(backbone: Any, prep: Any, size: int, seed: int) -> dict[str, float]:
    """mIoU and pixel accuracy (%) of the probe on the held-out scenes at ``size`` px
    (``backbone=None``: raw 4x4 pixel patches; ``"labels"``: each patch's class fractions)."""
    b = BUDGET
    view = DenseView.for_preprocessing(prep, size)
    train = scene_dataset("scenes", "train", view, b["seg_train"], target="mask")
    test = scene_dataset("scenes", "test", view, b["seg_test"], target="mask")
    if backbone is None:
        (f_tr, m_tr), (f_te, m_te) = _pixel_features(train), _pixel_features(test)
    elif backbone == "labels":
        n = len(train.classes)
        (f_tr, m_tr), (f_te, m_te) = _label_features(train, n, size // 4), _label_features(test, n, size // 4)
    else:
        f_tr, m_tr = extract_patch_features(backbone, train, progress=False)
        f_te, m_te = extract_patch_features(backbone, test, progress=False)
    r = segmentation_probe(f_tr, m_tr, f_te, m_te, len(train.classes), epochs=b["probe_epochs"],
                           lrs=b["probe_lrs"], seed=seed, progress=False)
    return {f"miou@{size}": r.miou, f"pixel_acc@{size}": r.pixel_accuracy, f"probe_lr@{size}": r.lr}


def cls_scores(backbone: Any, prep: Any, seed: int) -> dict[str, float]:
    """k-NN and linear-probe top-1 (%) on the one-item scenes at 56 px (``None``: raw pixels)."""
    b = BUDGET
    view = DenseView.for_preprocessing(prep, HIGH_SIZE)
    bank = DataLoader(scene_dataset("scene-items", "train", view, b["knn_bank"]), batch_size=256)
    test = DataLoader(scene_dataset("scene-items", "test", view, b["knn_test"]), batch_size=256)
    if backbone is None:
        (f_b, y_b), (f_t, y_t) = ([torch.cat(t) for t in zip(*[(x.flatten(1), y) for x, y in dl], strict=True)]
                                  for dl in (bank, test))
    else:
        f_b, y_b = extract_features(backbone, bank, progress=False)
        f_t, y_t = extract_features(backbone, test, progress=False)
    return {"knn_top1": knn_evaluate(f_b, y_b, f_t, y_t, ks=(K,))[K]["top1"],
            "linear_top1": linear_top1(f_b, y_b, f_t, y_t, epochs=b["linear_epochs"], seed=seed)}


def score_all(backbone: Any, prep: Any, seed: int, full: bool) -> dict[str, float]:
    out = seg_scores(backbone, prep, HIGH_SIZE, seed)
    if full:
        out.update(seg_scores(backbone, prep, BASE_SIZE, seed))
        out.update(cls_scores(backbone, prep, seed))
    return out


# ------------------------------------------------------------------------------- rows
def cpu_now() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def tier_of(row: dict[str, Any]) -> str:
    """A row's tier: its ``tier``, else its ``long`` flag (``long`` or ``short``)."""
    return row.get("tier", "long" if row.get("long") else "short")


def row_name(method: str, seed: int, tier: str) -> str:
    return f"{slug(method)}_s{seed}{TIERS[tier][0]}"


def run_row(method: str, seed: int, tier: str) -> dict[str, Any]:
    b = BUDGET
    steps, every = b[f"{tier}_steps"], b[f"{tier}_every"]
    run_dir = WORK / row_name(method, seed, tier)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    preset, over = overrides(method, seed, steps, every, run_dir)
    c0, t0 = cpu_now(), time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", TRAIN, "train", "--config", preset, *over],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed}: training failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    train_cpu, train_wall = cpu_now() - c0, time.perf_counter() - t0
    curve = []
    ckpts = sorted((run_dir / "checkpoints").glob("step*.ckpt"), key=lambda p: int(p.stem[4:]))
    # the curves: seed 0's checkpoints (the last one gets every score below)
    for ckpt in (ckpts[:-1] if seed == 0 else []):
        loaded = load(str(ckpt))
        curve.append({"step": int(ckpt.stem[4:]), **seg_scores(loaded.backbone, _prep(run_dir), HIGH_SIZE, seed)})
    loaded = load(str(run_dir))
    final = score_all(loaded.backbone, _prep(run_dir), seed, full=True)
    curve.append({"step": steps, **{k: v for k, v in final.items() if k.endswith(f"@{HIGH_SIZE}")}})
    return {"method": method, "seed": seed, "steps": steps, "tier": tier, "long": tier == "long", **final,
            "curve": curve,
            **student_scores(run_dir, seed), "train_cpu_s": train_cpu, "train_wall_s": train_wall,
            "cpu_s": cpu_now() - c0}


def student_scores(run_dir: Path, seed: int) -> dict[str, float]:
    """The student's mIoU at 56 px and k-NN / linear top-1 (``student_`` keys). The EMA teacher's
    momentum nears 1 at the end of a run (cosine to 1), so the teacher takes up little of what a
    short last stage (the high-resolution one) teaches the student."""
    loaded = load(str(run_dir), "student")
    out = {**seg_scores(loaded.backbone, _prep(run_dir), HIGH_SIZE, seed),
           **cls_scores(loaded.backbone, _prep(run_dir), seed)}
    return {f"student_{k}": v for k, v in out.items()}


def add_student_scores() -> None:
    """Score the students of finished rows whose JSON lacks them (their run directories kept)."""
    for path in sorted(ROWS_DIR.glob("*.json")):
        row = json.loads(path.read_text())
        run_dir = WORK / path.stem
        if "student_miou@56" in row or not (run_dir / "checkpoints" / "last.ckpt").is_file():
            continue
        c0 = cpu_now()
        row.update(student_scores(run_dir, row["seed"]))
        row["cpu_s"] += cpu_now() - c0
        atomic.write_text(path, json.dumps(row, indent=1))
        print(f"{row['method']} seed {row['seed']}: student mIoU@56 {row['student_miou@56']:.1f}", flush=True)


def _prep(run_dir: Path) -> Any:
    return build_preprocessing(load_run_config(run_dir))


def baseline_row(name: str) -> dict[str, Any]:
    """Random init (the DINOv3 preset's tiny ViT at seed 0), raw pixels, or the patch labels (the
    probe's ceiling on this task: segmentation only)."""
    c0 = cpu_now()
    preset, over = overrides("DINOv3", 0, BUDGET["short_steps"], BUDGET["short_every"], WORK / "init")
    cfg = load_config(preset, over)
    prep = build_preprocessing(cfg)
    backbone: Any = None
    if name == "random init":
        torch.manual_seed(0)
        backbone = build_method(cfg).teacher_backbone.eval()
    if name == "patch labels":
        final = {**seg_scores("labels", prep, HIGH_SIZE, 0), **seg_scores("labels", prep, BASE_SIZE, 0)}
    else:
        final = score_all(backbone, prep, 0, full=True)
    return {"method": name, "seed": 0, "steps": 0, "tier": "short", "long": False, **final, "curve": [],
            "cpu_s": cpu_now() - c0}


def rows_wanted(seeds: list[int], only: list[str] | None, tiers: tuple[str, ...] = tuple(TIERS),
                demo_seeds: tuple[int, ...] = (0,)) -> list[tuple[str, int, str]]:
    """The (method, seed, tier) rows to train, in order: the first seed of every method, then the
    long rows (seed 0) and the demo-budget rows of the first demo seed, then the other seeds, so a
    cut run has one row of each. Long rows run for seed 0 and demo-budget rows for ``demo_seeds``,
    each only where ``seeds`` names it: a later start with ``--seeds 1`` adds short rows only."""
    demo = [s for s in demo_seeds if s in seeds]
    out = [(m, s, "short") for s in seeds[:1] for m in METHODS]
    out += [(m, 0, "long") for m in LONG if 0 in seeds]
    out += [(m, s, "demo") for s in demo[:1] for m in METHODS]
    out += [(m, s, "short") for s in seeds[1:] for m in METHODS]
    out += [(m, s, "demo") for s in demo[1:] for m in METHODS]
    return [r for r in out if (not only or r[0] in only) and r[2] in tiers]


# ------------------------------------------------------------------------------- report
def probe_tag() -> dict[str, Any]:
    """What a row's scores depend on besides its training: the probe's protocol."""
    return {k: BUDGET[k] for k in ("seg_train", "seg_test", "probe_epochs", "probe_lrs")}


def current(path: Path) -> bool:
    """Whether the row at ``path`` exists and was scored with the current probe."""
    return path.is_file() and json.loads(path.read_text()).get("probe") == probe_tag()


def load_rows() -> list[dict[str, Any]]:
    return [row for p in sorted(ROWS_DIR.glob("*.json")) if (row := json.loads(p.read_text())).get("probe") == probe_tag()]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    cols = (("miou@56", "mIoU @56"), ("pixel_acc@56", "pixel acc @56"), ("miou@28", "mIoU @28"),
            ("knn_top1", "k-NN (items)"), ("linear_top1", "linear (items)"),
            ("student_miou@56", "student mIoU @56"), ("student_knn_top1", "student k-NN"))
    head = "| row | steps | seeds | " + " | ".join(c[1] for c in cols) + " | CPU s / run |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    order = ["patch labels", "raw pixels", "random init", *METHODS]
    for tier, (_, label) in TIERS.items():
        for name in order:
            group = [r for r in rows if r["method"] == name and tier_of(r) == tier]
            if not group:
                continue
            vals = [_mean_std([r[k] for r in group if r.get(k) is not None]) for k, _ in cols]
            cpu = statistics.fmean(r["cpu_s"] for r in group)
            lines.append(f"| {name}{label} | {group[0]['steps']} | {len(group)} | "
                         + " | ".join(vals) + f" | {cpu:.0f} |")
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    tiers = [t for t in TIERS if any(tier_of(r) == t and r["curve"] for r in rows)]
    fig = new_figure(5 * len(tiers), 3.6)
    titles = {"short": "short runs (seed 0)", "long": "long runs (seed 0)", "demo": "demo budget (seed 0)"}
    for i, tier in enumerate(tiers):
        ax = fig.add_subplot(1, len(tiers), i + 1)
        base = next((r for r in rows if r["method"] == "random init"), None)
        for r in rows:
            if tier_of(r) != tier or r["seed"] != 0 or not r["curve"]:
                continue
            pts = [(0, base["miou@56"])] if base else []
            pts += [(c["step"], c["miou@56"]) for c in r["curve"]]
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=r["method"])
        ax.set_xlabel("training step")
        ax.set_ylabel("mIoU (%) at 56 px, held-out scenes")
        ax.set_title(titles[tier], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


def write_report() -> None:
    rows = load_rows()
    if not rows:
        print("no rows yet")
        return
    png = plot_curves(rows, RESULTS / "dense_miou.png")
    body = table(rows)
    total = sum(r["cpu_s"] for r in rows)
    body += f"\n\nCPU time of all rows above: {total:.0f} s (training and scoring, one thread)."
    write_section(ROOT / "BENCHMARKS.md", "dense", "Dense features (benchmarks/dense.py)", body)
    print(body)
    print(f"curves: {png}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", default=None, help="row names (methods, 'random init', 'raw pixels', "
                   "'patch labels')")
    p.add_argument("--tiers", nargs="+", choices=list(TIERS), default=list(TIERS),
                   help="row tiers to run: short (3 seeds), long (seed 0), demo (the demo budget, --demo-seeds)")
    p.add_argument("--demo-seeds", type=int, nargs="+", default=[0],
                   help="seeds of the demo-budget rows (among --seeds); 0 by default, 0 1 2 for the spread")
    p.add_argument("--report", action="store_true", help="only write the table and the curves")
    p.add_argument("--students", action="store_true",
                   help="only score the students of finished rows that lack them, then report")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if not a.report:
        demo_data(strict=True, what="dense.py")
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    if a.students:
        add_student_scores()
    elif not a.report:
        for name in ("patch labels", "raw pixels", "random init"):
            out = ROWS_DIR / f"{slug(name)}.json"
            if (not a.only or name in a.only) and not current(out):
                row = {**baseline_row(name), "probe": probe_tag()}
                atomic.write_text(out, json.dumps(row, indent=1))
                print(f"{name}: mIoU@56 {row['miou@56']:.1f}  ({row['cpu_s']:.0f} CPU s)", flush=True)
        for method, seed, tier in rows_wanted(a.seeds, a.only, tuple(a.tiers), tuple(a.demo_seeds)):
            out = ROWS_DIR / f"{row_name(method, seed, tier)}.json"
            if current(out):
                continue
            row = {**run_row(method, seed, tier), "probe": probe_tag()}
            atomic.write_text(out, json.dumps(row, indent=1))
            print(f"{method} seed {seed}{TIERS[tier][1]}: mIoU@56 {row['miou@56']:.1f} "
                  f"k-NN {row['knn_top1']:.1f} ({row['cpu_s']:.0f} CPU s)", flush=True)
    write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
