"""``dinokit demo [key=value ...]``: the README's main job."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="pretrain the main-job preset on small real data, print k-NN/linear accuracy, draw pictures",
        description=(
            "Pretrain a small backbone with DINO on Fashion-MNIST (or scikit-learn's digits), then "
            "print the k-NN and linear-probe accuracy of the trained teacher next to the same "
            "backbone at random init and raw pixels, and write attention/PCA (ViTs), t-SNE and "
            "curve pictures into the run directory.\n"
            "Overrides work as for `dinokit train`, e.g. `dinokit demo trainer.epochs=1`."
        ),
    )
    p.add_argument("--config", default=None,
                   help="preset or YAML file (default: the main job's preset, demo_cnn)")
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
