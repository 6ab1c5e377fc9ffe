"""``dinokit`` command line: ``train``, ``demo``, ``eval``, ``viz``, ``export``, ``presets``.

Each subcommand lives in its own module with ``register(subparsers)``; the commands only compose
library calls.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("train", "demo", "evaluate", "visualize", "export", "presets")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinokit",
        description="DINO-family self-supervised learning: train, evaluate, draw and export.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dinokit.cli.{name}")
        except ModuleNotFoundError as e:  # pragma: no cover - a command still being built
            if e.name and e.name.startswith("dinokit.cli"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinokit`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from dinokit.config import ConfigError
    from dinokit.weights import WeightsError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, WeightsError, FileNotFoundError) as e:
        print(f"dinokit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
