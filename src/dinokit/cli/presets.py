"""``dinokit presets``: list the shipped YAML presets with their first comment line."""

from __future__ import annotations

import argparse
from importlib import resources

from dinokit.config import preset_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the shipped config presets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in preset_names():
        text = resources.files("dinokit").joinpath("configs", f"{name}.yaml").read_text()
        first = next((ln[1:].strip() for ln in text.splitlines() if ln.startswith("#")), "")
        print(f"{name:22s} {first}")
    return 0
