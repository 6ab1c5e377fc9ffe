"""``dinokit embed --checkpoint RUN|EXPORT --data FOLDER --output OUT``: features to .npy + .csv."""

from __future__ import annotations

import argparse

from dinokit.cli._common import add_student_arg, which_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="features of a folder of images to .npy + .csv (+ .parquet)",
        description="Embed every image under --data with a trained or exported backbone; unreadable "
                    "images are skipped and listed. Same as dinokit.embed.embed + save_embeddings.")
    p.add_argument("--checkpoint", required=True,
                   help="run directory, training .ckpt, export folder, exported .safetensors, or an "
                        "exported .onnx (run with onnxruntime on the CPU; needs dinokit[onnx])")
    p.add_argument("--data", required=True, help="image folder (recursive) or demo/digits/fashion-mnist")
    p.add_argument("--output", required=True, help="output path without extension")
    p.add_argument("--pool", choices=("cls", "mean"), default="cls",
                   help="CLS embedding or mean of the patch tokens (default: cls)")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher")
    add_student_arg(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="split of a preset dataset")
    p.add_argument("--limit", type=int, default=None, help="embed only the first N images")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinokit.embed import embed, save_embeddings

    emb = embed(args.checkpoint, args.data, pool=args.pool, batch_size=args.batch_size, which=which_of(args),
                device=args.device, split=args.split, limit=args.limit, num_workers=args.num_workers,
                progress=not args.no_progress)
    paths = save_embeddings(emb, args.output)
    print(f"embedded {len(emb.names)} images -> {emb.features.shape[1]}-d features ({args.pool})")
    for p in paths:
        print(f"written: {p}")
    if emb.skipped:
        print(f"skipped {len(emb.skipped)} unreadable image(s):")
        for name in emb.skipped:
            print(f"  {name}")
    return 0
