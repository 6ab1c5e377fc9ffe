"""Multi-crop data path: images/s per worker core for DINO's recipe (2 x 224 + 8 x 96 crops of JPEG
images), dinokit's batched path against the textbook per-sample torchvision v2 pipeline.

Both paths start from the same JPEG files and end with the same normalised float32 views stacked
per crop ([B, 3, 224, 224] x 2 and [B, 3, 96, 96] x 8), on one core (``torch.set_num_threads(1)``,
what one DataLoader worker gets):

- textbook: per image, PIL decode, then DINO's ``DataAugmentationDINO`` written with
  ``torchvision.transforms.v2`` on the PIL image (RandomResizedCrop bicubic, flip, ColorJitter p=0.8,
  RandomGrayscale, GaussianBlur 23 px with p = 1.0 / 0.1 / 0.5, RandomSolarize on global crop 2,
  ToImage, ToDtype, Normalize), then ``torch.stack`` per crop (the default collate);
- dinokit: per image, PIL decode to a uint8 tensor (:class:`DecodeUInt8`, the worker's half), then
  one :class:`BatchedMultiCrop` call per batch (``--device cuda`` runs that call on the GPU).
- augment_only: the :class:`BatchedMultiCrop` call alone, on images decoded beforehand and already
  on the device (what the batched path gives once decoding keeps up).

The two run interleaved, round after round, in one process; wall time and the process's CPU time
are both reported so contention from other processes shows. ``--write-md`` puts the table into
BENCHMARKS.md between the ``data-path`` markers.

    .venv/bin/python benchmarks/data_path.py                      # ~1 minute on one core
    .venv/bin/python benchmarks/data_path.py --device cuda --batch 64 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name, write_section  # noqa: E402

from dinokit.data import MultiCropConfig, MultiCropTransform  # noqa: E402
from dinokit.data.batched import BatchedMultiCrop, DecodeUInt8  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Path]:
    """``n`` photo-like JPEGs (smooth colour fields plus texture), ImageNet's typical 500 x 375."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) * 60 +
                         np.cos(yy / rng.uniform(20, 80) + rng.uniform(0, 6)) * 60 + rng.uniform(60, 190)
                         for _ in range(3)], -1)
        img = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        p = folder / f"{i:04d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def textbook_pipeline() -> list[v2.Compose]:
    """DINO's DataAugmentationDINO with torchvision.transforms.v2 on PIL images."""
    def crop(size: int, scale: tuple[float, float], blur: float, solarize: float) -> v2.Compose:
        steps = [v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
                 v2.RandomHorizontalFlip(p=0.5),
                 v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                 v2.RandomGrayscale(p=0.2),
                 v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur)]
        if solarize:
            steps.append(v2.RandomSolarize(threshold=128, p=solarize))
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        return v2.Compose(steps)

    return [crop(224, (0.4, 1.0), 1.0, 0.0), crop(224, (0.4, 1.0), 0.1, 0.2), crop(96, (0.05, 0.4), 0.5, 0.0)]


def run_textbook(paths: list[Path], pipes: list[v2.Compose], n_local: int) -> list[torch.Tensor]:
    g1, g2, loc = pipes
    per_image = []
    for p in paths:
        with Image.open(p) as f:
            img = f.convert("RGB")
        per_image.append([g1(img), g2(img)] + [loc(img) for _ in range(n_local)])
    return [torch.stack([views[j] for views in per_image]) for j in range(2 + n_local)]


def run_per_sample(paths: list[Path], transform: MultiCropTransform) -> list[torch.Tensor]:
    per_image = []
    for p in paths:
        with Image.open(p) as f:
            views = transform(f.convert("RGB"))
        per_image.append(views["global_views"] + views["local_views"])
    return [torch.stack([views[j] for views in per_image]) for j in range(len(per_image[0]))]


def run_batched(paths: list[Path], decode: DecodeUInt8, aug: BatchedMultiCrop, gen: torch.Generator,
                device: str) -> list[torch.Tensor]:
    images = []
    for p in paths:
        with Image.open(p) as f:
            images.append(decode(f))
    out = aug([im.pin_memory() if device == "cuda" else im for im in images], gen)
    views = out["global_views"] + out["local_views"]
    if device == "cuda":
        torch.cuda.synchronize()
    return views


def run_augment(decoded: list[torch.Tensor], aug: BatchedMultiCrop, gen: torch.Generator,
                device: str) -> list[torch.Tensor]:
    """The batched augmentation alone, on images already decoded and on the device."""
    out = aug(decoded, gen)
    views = out["global_views"] + out["local_views"]
    if device == "cuda":
        torch.cuda.synchronize()
    return views


def timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def measure(batch: int, rounds: int, device: str = "cpu", resize: str = "auto") -> dict:
    """Images/s of the three paths (interleaved rounds after one warm-up each) on ``batch`` JPEGs;
    ``resize`` is :class:`BatchedMultiCrop`'s (``auto``: ``roi_align`` on CUDA, ``resize`` on CPU).
    Also times the batched augmentation alone on images already decoded and on ``device``
    (``augment_only``: the on-device path's ceiling once decoding keeps up)."""
    cfg = MultiCropConfig()  # DINO's ImageNet recipe: 2 x 224 + 8 x 96
    pipes = textbook_pipeline()
    aug = BatchedMultiCrop(cfg, device=device, resize=resize)
    decode = DecodeUInt8(channels=3)
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), batch)
        shapes_t = [tuple(v.shape) for v in run_textbook(paths, pipes, cfg.n_local)]  # warm-up
        shapes_b = [tuple(v.shape) for v in run_batched(paths, decode, aug, gen, device)]
        assert shapes_t == shapes_b, (shapes_t, shapes_b)
        per_sample = MultiCropTransform(cfg)
        run_per_sample(paths[:2], per_sample)
        decoded = []
        for p in paths:
            with Image.open(p) as f:
                decoded.append(decode(f).to(device))
        names = ("textbook", "per_sample", "dinokit", "augment_only")
        res: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in names}
        for _ in range(rounds):  # interleaved: every path sees the same machine state
            for name, fn in (("textbook", lambda: run_textbook(paths, pipes, cfg.n_local)),
                             ("per_sample", lambda: run_per_sample(paths, per_sample)),
                             ("dinokit", lambda: run_batched(paths, decode, aug, gen, device)),
                             ("augment_only", lambda: run_augment(decoded, aug, gen, device))):
                wall, cpu = timed(fn)
                res[name]["wall"].append(wall)
                res[name]["cpu"].append(cpu)
    rows = {}
    for name, r in res.items():
        wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
        rows[name] = {"images_per_s_wall": batch / wall, "images_per_cpu_s": batch / cpu, "wall_s": r["wall"],
                      "cpu_s": r["cpu"]}
    for r in rows.values():
        r["ratio_wall"] = r["images_per_s_wall"] / rows["textbook"]["images_per_s_wall"]
        r["ratio_cpu"] = r["images_per_cpu_s"] / rows["textbook"]["images_per_cpu_s"]
    return {"batch": batch, "rounds": rounds, "device": device,
            "resize": resize if resize != "auto" else ("roi_align" if device == "cuda" else "resize"),
            "results": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="images per batch (per round and path)")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per path (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = one worker core)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the batched path runs")
    ap.add_argument("--write-md", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()} ({os.cpu_count()} cores visible), {torch.get_num_threads()} torch thread(s)"
                   + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                    f"Pillow {Image.__version__}, Python {platform.python_version()}",
        "command": "benchmarks/data_path.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **measure(args.batch, args.rounds, args.device),
    }
    out = ROOT / "benchmarks" / "results" / f"data_path_{args.device}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(info, indent=2))
    table = markdown(info)
    print(table)
    if args.write_md:
        write_section(ROOT / "BENCHMARKS.md", "data-path", "Data path", table)
    return 0


def markdown(info: dict) -> str:
    r = info["results"]
    lines = [
        f"{info['date']}; {info['machine']}; {info['versions']}. "
        f"`{info['command'].strip()}`: batches of {info['batch']} JPEGs (500 x 375, quality 90) -> "
        f"2 x 224 + 8 x 96 normalised crops, median of {info['rounds']} interleaved rounds per path "
        f"(batched augmentation on {info['device']}).",
        "",
        "| path | images/s (wall) | images per CPU-second | vs textbook (wall / CPU) |",
        "| --- | ---: | ---: | ---: |",
    ]
    labels = {"textbook": "textbook torchvision v2 on PIL, per sample",
              "per_sample": "dinokit `MultiCropTransform` (float tensors, per sample)",
              "dinokit": "dinokit `DecodeUInt8` + `BatchedMultiCrop`",
              "augment_only": "dinokit `BatchedMultiCrop` alone (decoded images on the device)"}
    for name, label in labels.items():
        if name not in r:
            continue
        lines.append(f"| {label} | {r[name]['images_per_s_wall']:.1f} | {r[name]['images_per_cpu_s']:.1f} | "
                     f"{r[name]['ratio_wall']:.2f}x / {r[name]['ratio_cpu']:.2f}x |")
    return "\n".join(lines)





if __name__ == "__main__":
    raise SystemExit(main())
