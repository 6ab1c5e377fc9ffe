"""``dinokit demo [key=value ...]``: the README's main job."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="pretrain the demo preset on a small real dataset, print k-NN accuracy, draw pictures",
        description=(
            "Pretrain a tiny ViT with DINO on Fashion-MNIST (or scikit-learn's digits), then print "
            "the k-NN accuracy of the trained teacher next to the same ViT at random init and raw "
            "pixels, and write attention/PCA/t-SNE/curve pictures into the run directory.\n"
            "Overrides work as for `dinokit train`, e.g. `dinokit demo trainer.epochs=1`."
        ),
    )
    p.add_argument("--config", default="demo", help="preset or YAML file (default: demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinokit.demo import run_demo

    report = run_demo(args.overrides, config=args.config)
    print()
    print(report.table())
    print(f"\nrun directory: {report.run_dir}")
    print("pictures:")
    for p in report.pictures:
        print(f"  {p}")
    return 0
