"""``dinokit eval knn|linear|seg``: k-NN and linear-probe accuracy of a trained backbone (``seg``:
the linear segmentation probe, :mod:`dinokit.cli.segment`).

The results of a run go to ``<run>/eval/knn.json`` (``linear.json``); an earlier result file is
kept, renamed after the time it was written (``knn.2026-01-31T12-00-00.json``), and the command
says so. A training bank of one class is refused (every vote would go to it), and a k larger
than the bank is said to be clamped to the bank's size.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dinokit import atomic
from dinokit.cli import segment
from dinokit.cli._common import add_checkpoint_arg, dataset, keep_earlier, load, loader, which_of
from dinokit.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="k-NN, linear-probe or segmentation-probe scores of a trained backbone")
    kinds = p.add_subparsers(dest="eval_kind", metavar="{knn,linear,seg}", required=True)
    for name, text in (("knn", "weighted k-NN (DINO protocol)"),
                       ("linear", "linear probe on frozen features")):
        q = kinds.add_parser(name, help=text, description=text)
        add_checkpoint_arg(q)
        q.add_argument("--train-data", required=True, help="labelled folder, or demo|fashion-mnist|digits")
        q.add_argument("--val-data", required=True, help="labelled folder, or demo|fashion-mnist|digits")
        q.add_argument("--features", default="cls",
                       choices=("cls", "avgpool", "cls+avgpool", "last_blocks", "last_blocks+avgpool"))
        q.add_argument("--n-last-blocks", type=int, default=4)
        q.add_argument("--batch-size", type=int, default=256)
        q.add_argument("--limit-train", type=int, default=None)
        q.add_argument("--limit-val", type=int, default=None)
        if name == "knn":
            q.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
            q.add_argument("--temperature", type=float, default=0.07)
        else:
            q.add_argument("--mode", choices=("sgd", "logistic"), default="sgd")
            q.add_argument("--lrs", type=float, nargs="+", default=None,
                           help="learning rates swept (default: dinokit.eval.linear.DEFAULT_LRS, 1e-3..10)")
            q.add_argument("--epochs", type=int, default=100)
        q.set_defaults(func=run)
    segment.add_parser(kinds)


def run(args: argparse.Namespace) -> int:
    from dinokit.eval import extract_features, knn_evaluate, linear_probe
    from dinokit.eval.linear import DEFAULT_LRS

    model = load(args.checkpoint, which_of(args))
    feats = []
    for spec, split, limit in ((args.train_data, "train", args.limit_train),
                               (args.val_data, "test", args.limit_val)):
        ds = dataset(spec, model.transform, split=split, limit=limit, need_labels=True)
        feats.append(extract_features(model.backbone, loader(ds, args.batch_size), kind=args.features,
                                      n_last_blocks=args.n_last_blocks))
    (f_tr, y_tr), (f_va, y_va) = feats
    _check_bank(args.train_data, y_tr)
    if args.eval_kind == "knn":
        _check_ks(args.ks, len(f_tr), args.train_data)
        res = knn_evaluate(f_tr, y_tr, f_va, y_va, ks=tuple(args.ks), temperature=args.temperature)
        print(f"k-NN ({args.features} features, T={args.temperature}):")
        print(f"  {'k':>5}  {'top-1':>7}  {'top-5':>7}")
        for k, r in res.items():
            top5 = "-" if r["top5"] is None else f"{r['top5']:.2f}"
            print(f"  {k:>5}  {r['top1']:7.2f}  {top5:>7}")
        payload: dict = {"features": args.features, "results": {str(k): v for k, v in res.items()}}
    else:
        res = linear_probe(f_tr, y_tr, f_va, y_va, mode=args.mode, lrs=tuple(args.lrs or DEFAULT_LRS),
                           epochs=args.epochs)
        print(f"linear probe ({args.mode}, {args.features} features):")
        for lr, r in res.per_lr.items():
            mark = "  <- best" if lr == res.best_lr else ""
            print(f"  {'C' if args.mode == 'logistic' else 'lr'}={lr:<8g} top-1 {r['top1']:6.2f}{mark}")
        top5 = "-" if res.top5 is None else f"{res.top5:.2f}"
        print(f"best: top-1 {res.top1:.2f}  top-5 {top5}")
        payload = {"features": args.features, "mode": args.mode, "best_lr": res.best_lr, "top1": res.top1,
                   "top5": res.top5, "per_lr": {str(k): v for k, v in res.per_lr.items()}}
    if model.run_dir is not None:
        out = model.run_dir / "eval" / f"{args.eval_kind}.json"
        kept = keep_earlier(out)
        atomic.write_text(out, json.dumps(payload, indent=2))
        print(f"written: {out}" + (f" (the earlier results are kept as {kept.name})" if kept else ""))
    return 0


def _check_bank(spec: str, labels: torch.Tensor) -> None:
    """Refuse a training set of one class: every vote (and every probe output) goes to it."""
    classes = torch.unique(torch.as_tensor(labels)[torch.as_tensor(labels) >= 0])
    if len(classes) < 2:
        raise ConfigError(f"--train-data {spec}: it has {len(classes)} class; k-NN and linear "
                          "evaluation need at least 2 (with one, every prediction is right by construction)")


def _check_ks(ks: list[int], bank: int, spec: str) -> None:
    bad = [k for k in ks if k < 1]
    if bad:
        raise ConfigError(f"--ks: every k must be >= 1, got {bad[0]}")
    over = [k for k in ks if k > bank]
    if over:
        print(f"dinokit eval: note: --ks {' '.join(map(str, over))}: more than the {bank} images of "
              f"--train-data {spec}; clamped to k={bank} (all of them vote)", file=sys.stderr)
