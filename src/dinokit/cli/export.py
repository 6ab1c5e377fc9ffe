"""``dinokit export --checkpoint RUN|CKPT --output PATH``: a timm/Hub folder and a single file (or
``--format onnx|hf``: an ONNX graph, a transformers folder)."""

from __future__ import annotations

import argparse

from dinokit.cli import interop_export
from dinokit.cli._common import add_student_arg, which_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export the backbone: timm/Hugging Face folder + single safetensors file",
        description="Write PATH/ (config.json + model.safetensors, loadable with "
                    "timm.create_model('local-dir:PATH', pretrained=True)) and PATH.safetensors + PATH.json.")
    p.add_argument("--checkpoint", required=True, help="run directory or training .ckpt")
    p.add_argument("--output", required=True,
                   help="output path without extension (an earlier export there is replaced once the new one "
                        "is complete; a folder holding anything else is refused)")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="which backbone (default: the EMA teacher; a distillation run gives its student)")
    add_student_arg(p)
    p.add_argument("--format", choices=("both", "folder", "file", *interop_export.FORMATS), default="both",
                   help="timm/Hub folder, single file, or both (default); onnx = PATH.onnx (onnxruntime, "
                        "needs dinokit[onnx]); hf = PATH/ for transformers' AutoModel (needs dinokit[hf])")
    interop_export.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    args.which = which_of(args)
    if args.format in interop_export.FORMATS:
        return interop_export.run(args)

    from dinokit.export import NotTimmLoadableError, export_backbone, export_timm_folder, read_metadata

    if args.format in ("both", "folder"):
        try:
            folder = export_timm_folder(args.checkpoint, args.output, which=args.which)
            print(f"written: {folder}/config.json, {folder}/model.safetensors")
            print(f"  timm.create_model('local-dir:{folder}', pretrained=True)")
        except NotTimmLoadableError as e:
            if args.format == "folder":
                raise
            print(f"no timm folder: {e}")
    if args.format in ("both", "file"):
        path = export_backbone(args.checkpoint, args.output, which=args.which)
        meta = read_metadata(path)
        print(f"written: {path}\n         {path.with_suffix('.json')}")
        print("load with dinokit.load_backbone(path), or timm:")
        kw = ", ".join(f"{k}={v!r}" for k, v in meta["timm_kwargs"].items())
        print(f"  timm.create_model({meta['architecture']!r}, pretrained=True, num_classes=0, {kw}, "
              f"pretrained_cfg_overlay=dict(file={json.dumps(str(path))}))")
    return 0
