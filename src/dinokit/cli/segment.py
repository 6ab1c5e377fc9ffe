"""``dinokit eval seg``: the linear segmentation probe on a backbone's frozen patch features.

Data: a folder with ``images/`` and ``masks/`` (PNG class ids, matching names; see
:mod:`dinokit.data.masks`), or ``scenes`` (the built-in dense task, :mod:`dinokit.data.scenes`).
Writes ``seg.json`` (mIoU, pixel accuracy, per class) and ``seg.png`` (image / mask / prediction)
to ``<run>/eval/`` (``--out`` elsewhere; the current directory's ``eval/`` for an exported file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from dinokit import atomic
from dinokit.cli._common import add_checkpoint_arg, keep_earlier, load, which_of
from dinokit.config import ConfigError
from dinokit.data.masks import DEFAULT_IGNORE_INDEX, MaskFolderDataset
from dinokit.data.scenes import SCENES, scene_dataset

BUILT_IN = ("scenes",)
#: The official linear head's learning rate and the rates a short probe picks from
#: (dinokit.eval.segmentation's DEFAULT_LR and PROBE_LRS; that module loads torchvision, which
#: `dinokit --help` need not wait for).
DEFAULT_LR = 1e-3
PROBE_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def add_parser(kinds: Any) -> None:
    text = "linear segmentation probe on frozen patch features (DINOv2/v3 protocol)"
    q = kinds.add_parser("seg", help=text, description=text)
    add_checkpoint_arg(q)
    q.add_argument("--train-data", required=True,
                   help="folder with images/ and masks/ (PNG class ids, matching names), or scenes")
    q.add_argument("--val-data", required=True, help="as --train-data (scenes: the held-out scenes)")
    q.add_argument("--n-last-blocks", type=int, default=1,
                   help="patch tokens of the last N blocks, concatenated (1: the last layer; 4: the "
                   "official '4 last')")
    q.add_argument("--size", type=int, default=None,
                   help="images resized to SIZE x SIZE (default: scenes: 56 (whole patches), else the "
                   "training crop size)")
    q.add_argument("--n-classes", type=int, default=None,
                   help="class ids 0..N-1 (default: one more than the largest id in the training masks)")
    q.add_argument("--ignore-index", type=int, default=DEFAULT_IGNORE_INDEX, help="mask value not scored")
    q.add_argument("--epochs", type=int, default=20)
    q.add_argument("--lrs", type=float, nargs="+", default=list(PROBE_LRS),
                   help="learning rate(s); with several, each is scored on a held-out fifth of the training "
                   f"images and the best retrained on all (default {' '.join(map(str, PROBE_LRS))}; the "
                   f"official protocol: {DEFAULT_LR} for 40,000 iterations)")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--limit-train", type=int, default=None)
    q.add_argument("--limit-val", type=int, default=None)
    q.add_argument("--show", type=int, default=6, help="images in seg.png (0: no picture)")
    q.add_argument("--out", default=None, help="folder for seg.json and seg.png")
    q.set_defaults(func=run)


def dataset(spec: str, view: Any, *, split: str, limit: int | None, n_classes: int | None,
            ignore_index: int) -> Any:
    """``(image, mask)`` pairs of a mask folder or of the built-in scenes."""
    if spec == "scenes":
        return scene_dataset("scenes", split, view, limit, target="mask")
    if not Path(spec).is_dir():
        raise ConfigError(f"--{'train' if split == 'train' else 'val'}-data {spec}: not a folder with "
                          f"images/ and masks/, nor one of {list(BUILT_IN)}")
    ds = MaskFolderDataset(spec, view, n_classes=n_classes, ignore_index=ignore_index)
    return Subset(ds, range(min(limit, len(ds)))) if limit else ds


def _classes(ds: Any) -> tuple[int, list[str], int | None]:
    inner = getattr(ds, "dataset", ds)
    if isinstance(inner, MaskFolderDataset):
        return inner.n_classes, inner.classes, inner.ignore_index
    return len(inner.classes), list(inner.classes), inner.ignore_index


def run(args: argparse.Namespace) -> int:
    # commands load their heavy parts (torchvision, matplotlib) when run
    from dinokit.eval.segmentation import DenseView, extract_patch_features, predict_masks, segmentation_probe
    from dinokit.viz.segmentation import plot_segmentation

    for name in ("epochs", "batch_size", "n_last_blocks"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if min(args.lrs) <= 0:
        raise ConfigError(f"--lrs: learning rates must be > 0, got {' '.join(map(str, args.lrs))}")
    model = load(args.checkpoint, which_of(args))
    backbone = model.backbone
    if backbone.patch_size is None:
        raise ConfigError(f"--checkpoint {args.checkpoint}: its backbone ({type(backbone).__name__}) gives "
                          "no "
                          "patch grid; the segmentation probe needs a ViT")
    patch = backbone.patch_size
    scenes = -(-SCENES.canvas // patch) * patch  # the canvas, rounded up to whole patches
    size = args.size or (scenes if args.train_data in BUILT_IN else model.transform.crop_size)
    if size % backbone.patch_size:
        raise ConfigError(f"--size {size}: must be a multiple of the patch size {backbone.patch_size}")
    view = DenseView(size, model.transform.mean, model.transform.std, model.transform.channels,
                     model.transform.interpolation)
    train = dataset(args.train_data, view, split="train", limit=args.limit_train, n_classes=args.n_classes,
                    ignore_index=args.ignore_index)
    n_classes, names, ignore = _classes(train)
    val = dataset(args.val_data, view, split="test", limit=args.limit_val, n_classes=n_classes,
                  ignore_index=args.ignore_index)
    if _classes(val)[0] != n_classes:
        raise ConfigError(f"--val-data {args.val_data}: {_classes(val)[0]} classes but --train-data "
                          f"{args.train_data} has {n_classes}")
    f_tr, m_tr = extract_patch_features(backbone, train, n_last_blocks=args.n_last_blocks,
                                        batch_size=args.batch_size)
    f_va, m_va = extract_patch_features(backbone, val, n_last_blocks=args.n_last_blocks,
                                        batch_size=args.batch_size)
    res = segmentation_probe(f_tr, m_tr, f_va, m_va, n_classes, ignore_index=ignore, class_names=names,
                             epochs=args.epochs, lrs=args.lrs)
    print(f"linear segmentation probe ({args.n_last_blocks} last block(s), {size} px, {len(train)} train / "
          f"{len(val)} val images):")
    print(f"  mIoU {res.miou:.2f}   pixel accuracy {res.pixel_accuracy:.2f}")
    if res.lr_sweep:
        tried = "  ".join(f"{lr:g}: {m:.2f}" for lr, m in res.lr_sweep.items())
        print(f"  learning rate {res.lr:g}, the best held-out mIoU of {tried}")
    else:
        print(f"  learning rate {res.lr:g}")
    width = max(len(n) for n in names)
    for n, c in zip(names, res.per_class, strict=True):
        iou = "-" if c["iou"] is None else f"{c['iou']:6.2f}"
        print(f"  {n:<{width}}  IoU {iou:>6}  pixels {c['pixels']}")
    out = Path(args.out) if args.out else (model.run_dir / "eval" if model.run_dir else Path("eval"))
    payload = {"checkpoint": str(args.checkpoint), "train_data": args.train_data, "val_data": args.val_data,
               "size": size, "n_last_blocks": args.n_last_blocks, "n_classes": n_classes,
               "ignore_index": ignore, "epochs": args.epochs, **res.to_dict()}
    target = out / "seg.json"
    kept = keep_earlier(target)
    atomic.write_text(target, json.dumps(payload, indent=2))
    print(f"written: {target}" + (f" (the earlier results are kept as {kept.name})" if kept else ""))
    if args.show > 0:
        n = min(args.show, len(val))
        assert res.head is not None
        preds = predict_masks(res.head, f_va[:n], [tuple(m.shape) for m in m_va[:n]])
        images = torch.stack([val[i][0] for i in range(n)])
        png = plot_segmentation(images, m_va[:n], preds, out / "seg.png", n_classes, mean=view.mean,
                                std=view.std, ignore_index=ignore)
        print(f"written: {png}")
    return 0

