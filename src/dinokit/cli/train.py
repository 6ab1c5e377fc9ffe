"""``dinokit train --config <preset|file.yaml> [key=value ...]``."""

from __future__ import annotations

import argparse

from dinokit.config import help_text, load_config, preset_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a backbone (DINO, DINOv2, DINOv3)",
        description=(
            "Pretrain with a YAML preset or file, overridden by key=value pairs, e.g.\n"
            "  dinokit train --config demo trainer.epochs=2 optim.lr=0.002\n"
            "  dinokit train --config my_images.yaml data.path=/data/photos\n"
            "  dinokit train --config my.yaml trainer.run_name=r1 trainer.resume=auto  (resubmittable)\n"
            f"Presets: {', '.join(preset_names())}.\n\n"
            "Exit codes: 0 done, 2 bad config/data/path/checkpoint, 3 stopped by a guard (collapse, "
            "non-finite), 74 a checkpoint could not be written, 75 pre-empted (SIGTERM/SIGUSR1) after "
            "checkpointing: resubmit with trainer.resume=auto. --debug shows tracebacks.\n\n"
            "Options (key=default  (type)  meaning):"
        ),
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", default=None, help="preset name or YAML file")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from dinokit.train.fit import fit

    result = fit(cfg)
    print(f"run directory: {result.run_dir}")
    if result.last_checkpoint:
        print(f"last checkpoint: {result.last_checkpoint}")
    else:
        print("last checkpoint: none written")
    if result.collapse:
        print(result.collapse)
    if result.skipped_images:
        print(f"unreadable images skipped: {result.skipped_images}")
    if result.damaged_shards:
        print(f"damaged shards cut short: {len(result.damaged_shards)} ({', '.join(result.damaged_shards)})")
    return 0
