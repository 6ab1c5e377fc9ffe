"""``dinokit eval knn|linear``: k-NN and linear-probe accuracy of a trained backbone."""

from __future__ import annotations

import argparse
import json

from dinokit.cli._common import add_checkpoint_arg, dataset, load, loader


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="k-NN or linear-probe accuracy of a trained backbone")
    kinds = p.add_subparsers(dest="eval_kind", metavar="{knn,linear}", required=True)
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


def run(args: argparse.Namespace) -> int:
    from dinokit.eval import extract_features, knn_evaluate, linear_probe
    from dinokit.eval.linear import DEFAULT_LRS

    model = load(args.checkpoint, args.which)
    feats = []
    for spec, split, limit in ((args.train_data, "train", args.limit_train),
                               (args.val_data, "test", args.limit_val)):
        ds = dataset(spec, model.transform, split=split, limit=limit, need_labels=True)
        feats.append(extract_features(model.backbone, loader(ds, args.batch_size), kind=args.features,
                                      n_last_blocks=args.n_last_blocks))
    (f_tr, y_tr), (f_va, y_va) = feats
    if args.eval_kind == "knn":
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
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(payload, indent=2))
        print(f"written: {out}")
    return 0
