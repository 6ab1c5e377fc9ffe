"""``dinokit`` command line: ``train``, ``demo``, ``eval``, ``viz``, ``export``, ``embed``, ``data``,
``presets``.

Each subcommand lives in its own module with ``register(subparsers)``; the commands only compose
library calls.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("train", "demo", "evaluate", "visualize", "export", "embed", "data", "presets")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinokit",
        description="DINO-family self-supervised learning: train, evaluate, draw and export.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also accepted after COMMAND)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dinokit.cli.{name}")
        except ModuleNotFoundError as e:  # pragma: no cover - a command whose optional module is absent
            if e.name and e.name.startswith("dinokit.cli"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinokit`` script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line: show tracebacks
    args = parser.parse_args([a for a in argv if a != "--debug"])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from dinokit.cli._common import run_guarded

    return run_guarded(args.command, args.func, args, debug=debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
