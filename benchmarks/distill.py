"""Distillation at a small CPU budget: a tiny DINOv3 teacher distilled into resnet10t and into a
smaller ViT on Fashion-MNIST, against the same students trained by DINO from scratch for the same
number of steps, and against the teacher.

The teacher is the tiny ViT of the ``dinov3_tiny_cpu`` preset, trained here once (``--teacher-steps``,
the demo budget by default) and cached in the results folder; each student is distilled with ``distill_tiny_cpu`` (the
DINOv3-style objective: the student's heads learn the teacher's centred DINO and iBOT targets)
and trained from scratch with DINO (``demo_cnn`` for resnet10t, ``demo`` for the ViT) for the same
``--steps``, over ``--seeds`` seeds. resnet10t is also distilled with the feature objective on one
view per image (``--one-view``), the work of a lightly-train step, next to lightly-train's own
distillation; those rows run seed by seed between dinokit's, so that the shared cores' load weighs
on both alike. Every network is scored with ``benchmarks/quality.py``'s
code: k-NN top-1 (k=20) and a linear probe on a bank of training images, on the test split.

    .venv/bin/python benchmarks/distill.py                        # the BENCHMARKS.md table (~3,300 CPU-s)
    .venv/bin/python benchmarks/distill.py --steps 2000 --students vit_2x32 vit_3x48 --peer-seeds 0 \
        --no-one-view --out /tmp/d2000 --md /tmp/d2000.md                       # the ViT students, longer
    .venv/bin/python benchmarks/distill.py --steps 5 --teacher-steps 5 --seeds 1 --peer-seeds 0 \
        --peer-long-steps 0 --out /tmp/d --md /tmp/B.md                          # a smoke run

The lightly-train rows (``--peer-seeds``) run ``peer_distill.py`` in ``.bench-venv-lightly-train``
(see BENCHMARKS.md); without that environment they are left out with a note.

Restartable: each row (teacher; student x objective x seed) is written to its own JSON under
``--out`` when it finishes and skipped when present, so a killed run loses one row at most. The
table between ``<!-- distill:begin -->`` and ``<!-- distill:end -->`` in BENCHMARKS.md is
regenerated from those files.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_data, machine, write_section
from quality import eval_loaders, feature_diagnostics, score

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "distill"
PEER_PY = ROOT / ".bench-venv-lightly-train" / "bin" / "python"
PEER = "lightly-train distillation"
#: the small ViT student: the teacher's patch size (4) and grid, half its width, 2 blocks (18 % of its
#: parameters). Both its runs (distilled, and DINO from scratch with `demo`, whose own ViT starts
#: from xavier) start from one initialisation, timm's, so the comparison has one difference.
SMALL_VIT = ("backbone.name=vit_tiny_patch16_224",
             "backbone.kwargs={img_size: 28, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2, in_chans: 1}",
             "backbone.init=timm")
#: a ViT of 57 % of the teacher's parameters: its 3 blocks at three quarters of its width
MID_VIT = ("backbone.name=vit_tiny_patch16_224",
           "backbone.kwargs={img_size: 28, patch_size: 4, depth: 3, embed_dim: 48, num_heads: 2, in_chans: 1}",
           "backbone.init=timm")
#: student -> (preset trained from scratch with DINO, overrides of the scratch run, overrides of the distillation)
STUDENTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "resnet10t": ("demo_cnn", (), ()),
    "vit_2x32": ("demo", SMALL_VIT, (*SMALL_VIT, "heads.batch_norm=false")),
    "vit_3x48": ("demo", MID_VIT, (*MID_VIT, "heads.batch_norm=false")),
}
#: the students of the default run (``--students`` names others)
DEFAULT_STUDENTS = ["resnet10t", "vit_2x32"]

LABELS = {"resnet10t": "resnet10t", "vit_2x32": "ViT 2x32 (half the teacher's width, 2 blocks)",
          "vit_3x48": "ViT 3x48 (the teacher's 3 blocks, 57 % of its parameters)"}
#: dinokit's feature objective on the peer's views: one global crop per image, no local crop, so
#: that a step does the work of the peer's step (a student and a teacher forward of one view)
ONE_VIEW = ("distillation.objective=features", "crops.n_global=1", "crops.n_local=0")


def common(args: argparse.Namespace, seed: int, out: Path, name: str, steps: int) -> list[str]:
    return ["data.dataset=demo", f"data.limit={args.limit}", f"data.val_limit={args.test}",
            "data.batch_size=64", "data.num_workers=0", "crops.n_local=4", "trainer.epochs=100",
            f"trainer.max_steps={steps}", f"trainer.seed={seed}", f"trainer.output_dir={out}",
            f"trainer.run_name={name}", "trainer.progress=false", "trainer.accelerator=cpu",
            "trainer.devices=1", "trainer.knn_every_n_epochs=0", "trainer.log_every_n_steps=10"]


def train_and_score(preset: str, overrides: list[str], args: argparse.Namespace, seed: int,
                    score_network: str = "deployed") -> dict[str, Any]:
    """Train one run in this process, then score its deployed network (a distillation's student,
    DINO's EMA teacher) with quality.py's k-NN and linear probe."""
    from dinokit.config import load_config
    from dinokit.eval.features import extract_features
    from dinokit.train.fit import fit

    cfg = load_config(preset, overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = int(result.trainer.global_step)
    method = result.method.cpu().eval()
    bank, test = eval_loaders(cfg, args.bank, args.test)
    f_bank, y_bank = extract_features(method, bank, progress=False)
    f_test, y_test = extract_features(method, test, progress=False)
    out = score(f_bank, y_bank, f_test, y_test, args.probe_epochs, seed)
    out.update(feature_diagnostics(f_test))
    out.update({"steps": steps, "train_wall_s": wall, "train_cpu_s": cpu,
                "wall_s_per_step": wall / max(steps, 1), "cpu_s_per_step": cpu / max(steps, 1),
                "run_dir": str(result.run_dir)})
    return out


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the peer runs in one)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peer_and_score(args: argparse.Namespace, seed: int, teacher_dir: str, steps: int) -> dict[str, Any]:
    """lightly-train's distillation (``peer_distill.py`` in its own environment) of the same teacher
    into resnet10t on the same images, steps, batch and normalisation; scored here as the others."""
    import timm

    from dinokit.backbones import build_backbone
    from dinokit.config import load_config
    from dinokit.eval.features import extract_features
    from dinokit.export import export_timm_folder
    from dinokit.train.build import build_dataset, build_preprocessing

    cfg = load_config("distill_tiny_cpu", common(args, seed, args.out / "runs", f"peer-{seed}", steps))
    export = args.out / "runs" / "teacher_timm"
    if not export.is_dir():
        export_timm_folder(teacher_dir, export)
    images = args.out / "runs" / "images"
    if not (images / "complete").is_file():
        (images / "train").mkdir(parents=True, exist_ok=True)
        for i, (img, _) in enumerate(build_dataset(cfg, "train")):
            img.save(images / "train" / f"{i:05d}.png")
        (images / "complete").write_text("")
    pre = build_preprocessing(cfg).to_dict()
    out = args.out / "runs" / f"peer-{seed}-{steps}steps"
    cmd = [str(args.peer_python), str(ROOT / "benchmarks" / "peer_distill.py"), "--teacher", str(export),
           "--data", str(images / "train"), "--out", str(out), "--steps", str(steps), "--batch", "64",
           "--seed", str(seed), "--mean", str(pre["mean"][0]), "--std", str(pre["std"][0]),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{PEER} failed: {done.stderr[-3000:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=1)
    model.load_state_dict(torch.load(info["state"], weights_only=True))
    backbone = build_backbone(model).eval()
    bank, test = eval_loaders(cfg, args.bank, args.test)
    f_bank, y_bank = extract_features(backbone, bank, progress=False)
    f_test, y_test = extract_features(backbone, test, progress=False)
    res = score(f_bank, y_bank, f_test, y_test, args.probe_epochs, seed)
    res.update(feature_diagnostics(f_test))
    steps = int(info["steps"])
    res.update({"steps": steps, "train_wall_s": info["train_wall_s"], "train_cpu_s": info["train_cpu_s"],
                "wall_s_per_step": info["train_wall_s"] / steps, "cpu_s_per_step": info["train_cpu_s"] / steps,
                "lightly_train": info["lightly_train"]})
    return res


def row(path: Path, make: Any) -> dict[str, Any]:
    """The row's JSON when a finished run wrote it, else run ``make()`` and write it."""
    if path.is_file():
        return json.loads(path.read_text())
    t0 = _cpu()
    res = make()
    res["row_cpu_s"] = _cpu() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(path)
    return res


def aggregate(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(rows: dict[str, dict[str, Any]], args: argparse.Namespace, seeds: list[int]) -> str:
    teacher = rows["teacher"]
    lines = [
        f"Fashion-MNIST ({args.limit} training images, k-NN bank {args.bank}, {args.test} test images), "
        f"batch 64, 2 global + 4 local crops (the one-view rows: one global crop), {args.steps} student "
        f"steps, seeds {seeds}; teacher: "
        f"`dinov3_tiny_cpu` ({teacher['steps']} steps, seed 0). k-NN top-1 (k=20) and linear probe top-1 "
        "(%), mean ± std over seeds; time per step on this machine's CPU (1 thread).",
        "",
        "| network | objective | k-NN | linear | wall s/step | CPU s/step |",
        "|---|---|---|---|---|---|",
        f"| teacher: ViT 3x64 (`dinov3_tiny_cpu`) | DINOv3 | {aggregate([teacher['knn_top1']])} | "
        f"{aggregate([teacher['linear_top1']])} | {teacher['wall_s_per_step']:.3f} | "
        f"{teacher['cpu_s_per_step']:.3f} |",
    ]
    for student in STUDENTS:
        for kind, label in (("distill", "distilled (`distill_tiny_cpu`)"), ("scratch", "DINO from scratch"),
                            ("features_1view", "feature distillation, one view per image (the peer's views: "
                             "`distillation.objective=features crops.n_global=1 crops.n_local=0`)"),
                            ("peer", f"{PEER} (same teacher, steps, batch)"),
                            ("peer_long", f"{PEER}, {args.peer_long_steps} steps (about dinokit's CPU time)")):
            rs = [rows[f"{student}/{kind}/{s}"] for s in seeds if f"{student}/{kind}/{s}" in rows]
            if not rs:
                continue
            lines.append(
                f"| {LABELS[student]} | {label} | {aggregate([r['knn_top1'] for r in rs])} | "
                f"{aggregate([r['linear_top1'] for r in rs])} | "
                f"{statistics.mean(r['wall_s_per_step'] for r in rs):.3f} | "
                f"{statistics.mean(r['cpu_s_per_step'] for r in rs):.3f} |")
    total = sum(r.get("row_cpu_s", 0.0) for r in rows.values())
    lines += ["", f"CPU time of all rows (training and scoring): {total:.0f} s; {machine()}, "
              f"Python {platform.python_version()}, torch {torch.__version__}."]
    return "\n".join(lines)





def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="optimiser steps of every student run")
    p.add_argument("--teacher-steps", type=int, default=1870,
                   help="optimiser steps of the teacher run (1,870: the demo budget)")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds: --first-seed and those after it")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first student seed (runs of one command split over processes; the teacher's is 0)")
    p.add_argument("--limit", type=int, default=12000, help="training images")
    p.add_argument("--bank", type=int, default=2000, help="k-NN bank / linear-probe training images")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument("--probe-epochs", type=int, default=30)
    p.add_argument("--students", nargs="*", default=DEFAULT_STUDENTS, choices=list(STUDENTS),
                   help=f"students to distil (default {DEFAULT_STUDENTS})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT, help="per-row results and run folders")
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--peer-seeds", type=int, default=3, help=f"seeds of the {PEER} rows (resnet10t)")
    p.add_argument("--peer-long-steps", type=int, default=300,
                   help=f"also run the {PEER} rows for this many steps (0 = no)")
    p.add_argument("--peer-python", type=Path, default=PEER_PY, help="python of lightly-train's own venv")
    p.add_argument("--one-view", action=argparse.BooleanOptionalAction, default=True,
                   help="also distil resnet10t with the feature objective on one view per image (the peer's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    demo_data(strict=True, what="distill.py")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = args.out / "runs"
    rows: dict[str, dict[str, Any]] = {}
    teacher_json = args.out / "teacher.json"

    def train_teacher() -> dict[str, Any]:
        if args.first_seed:  # processes sharing --out would each train it, into one folder
            p.error(f"the teacher of {args.out} is not trained: run --first-seed 0 first, in one process")
        return train_and_score("dinov3_tiny_cpu", common(args, 0, runs, "teacher", args.teacher_steps), args, 0)

    rows["teacher"] = row(teacher_json, train_teacher)

    def teacher_dir() -> str:
        """The teacher's run folder, trained again where its cached row outlived it (results kept
        without their run folders): a student needs the teacher's weights, the table its scores."""
        if not Path(rows["teacher"]["run_dir"]).is_dir():
            print(f"{teacher_json}: the teacher's run folder is gone; training it again", flush=True)
            teacher_json.unlink()
            rows["teacher"] = row(teacher_json, train_teacher)
        return rows["teacher"]["run_dir"]
    for seed in seeds:
        for student in args.students:
            scratch_preset, scratch_extra, distill_extra = STUDENTS[student]
            key = f"{student}/distill/{seed}"
            rows[key] = row(args.out / f"{key}.json", lambda s=seed, st=student, ex=distill_extra: train_and_score(
                "distill_tiny_cpu", [*common(args, s, runs, f"distill-{st}-{s}", args.steps),
                                     f"model.teacher={teacher_dir()}", *ex], args, s))
            key = f"{student}/scratch/{seed}"
            rows[key] = row(args.out / f"{key}.json", lambda s=seed, st=student, pr=scratch_preset,
                            ex=scratch_extra: train_and_score(
                pr, [*common(args, s, runs, f"scratch-{st}-{s}", args.steps), *ex], args, s))
            if student != "resnet10t":
                continue
            # the peer's comparison, interleaved with dinokit's rows seed by seed (the shared cores'
            # load then weighs on both alike): dinokit on the peer's views, then the peer
            if args.one_view:
                key = f"{student}/features_1view/{seed}"
                rows[key] = row(args.out / f"{key}.json", lambda s=seed: train_and_score(
                    "distill_tiny_cpu", [*common(args, s, runs, f"features-1view-{s}", args.steps),
                                         f"model.teacher={teacher_dir()}", *ONE_VIEW], args, s))
            if seed < args.peer_seeds and args.peer_python.is_file():
                key = f"resnet10t/peer/{seed}"
                rows[key] = row(args.out / f"{key}.json",
                                lambda s=seed: peer_and_score(args, s, teacher_dir(), args.steps))
                if args.peer_long_steps:
                    key = f"resnet10t/peer_long/{seed}"
                    rows[key] = row(args.out / f"{key}.json",
                                    lambda s=seed: peer_and_score(args, s, teacher_dir(), args.peer_long_steps))
        print(json.dumps({k: {m: v.get(m) for m in ("knn_top1", "linear_top1", "cpu_s_per_step")}
                          for k, v in rows.items()}), flush=True)
    if args.peer_seeds and not args.peer_python.is_file():
        print(f"no {PEER} rows: {args.peer_python} is missing (see BENCHMARKS.md for its environment)")
    write_section(args.md, "distill", "Distillation: students from a tiny DINOv3 teacher", markdown(rows, args, seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
