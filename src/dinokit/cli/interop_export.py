"""``dinokit export --format onnx|hf``: the options and the run of the two interoperability formats
(:mod:`dinokit.interop.onnx`, :mod:`dinokit.interop.hf`)."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("onnx", "hf")


def _opset(text: str) -> int:
    from dinokit.interop.onnx import DEFAULT_OPSET

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < DEFAULT_OPSET:
        raise argparse.ArgumentTypeError(f"must be >= {DEFAULT_OPSET} (torch's ONNX exporter), got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options only ``--format onnx`` reads (``hf`` needs none)."""
    from dinokit.interop.onnx import DEFAULT_OPSET, PRECISIONS

    g = p.add_argument_group("--format onnx")
    g.add_argument("--opset", type=_opset, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET}, the lowest torch's exporter writes)")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="weights and compute in float32 or float16 (inputs and outputs stay float32)")
    g.add_argument("--static-size", action="store_true",
                   help="fix the image size to the run's input size (default: dynamic where the "
                        "architecture allows it)")


def run(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        from dinokit.interop.onnx import export_onnx, read_onnx_metadata

        path = export_onnx(args.checkpoint, args.output, which=args.which, opset=args.opset,
                           precision=args.precision, dynamic_size=not args.static_size)
        meta = read_onnx_metadata(path)
        pre = meta["preprocessing"]
        print(f"written: {path}  (input 'images' [batch, {pre['channels']}, H, W]; outputs "
              f"{', '.join(meta['outputs'])}; {meta['precision']}, opset {meta['opset']})")
        print(f"  preprocessing in its metadata: mean {pre['mean']}, std {pre['std']}, "
              f"input size {pre['input_size']}")
        print(f"  dinokit embed --checkpoint {path} --data FOLDER --output OUT   (onnxruntime, CPU)")
        return 0
    from dinokit.interop.hf import export_hf_folder

    folder = export_hf_folder(args.checkpoint, Path(args.output), which=args.which)
    print(f"written: {folder}/ (config.json, model.safetensors, preprocessor_config.json)")
    print(f"  transformers.AutoModel.from_pretrained({str(folder)!r})")
    print(f"  transformers.pipeline('image-feature-extraction', model={str(folder)!r})")
    return 0
