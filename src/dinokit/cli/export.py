"""``dinokit export --checkpoint RUN|CKPT --output PATH``: backbone to safetensors + JSON."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the backbone to safetensors (timm-loadable) + JSON",
                       description="Write PATH.safetensors (timm key names) and PATH.json (metadata).")
    p.add_argument("--checkpoint", required=True, help="run directory or training .ckpt")
    p.add_argument("--output", required=True, help="output path without extension")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from dinokit.export import export_backbone, read_metadata

    path = export_backbone(args.checkpoint, args.output, which=args.which)
    meta = read_metadata(path)
    print(f"written: {path}\n         {path.with_suffix('.json')}")
    print("load with dinokit.load_backbone(path), or timm:")
    kw = ", ".join(f"{k}={v!r}" for k, v in meta["timm_kwargs"].items())
    print(f"  timm.create_model({meta['architecture']!r}, pretrained=True, num_classes=0, {kw}, "
          f"pretrained_cfg_overlay=dict(file={json.dumps(str(path))}))")
    return 0
