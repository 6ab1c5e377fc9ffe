"""``dinokit data shard --input FOLDER --output DIR``: WebDataset tar shards from an image folder;
``dinokit data stats FOLDER``: per-band mean and std of multi-band images."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare data (WebDataset shards; per-band statistics of multi-band "
                                    "images)")
    kinds = p.add_subparsers(dest="data_command", metavar="{shard,stats}", required=True)
    st = kinds.add_parser(
        "stats", help="per-channel mean and std of a folder of multi-band images (GeoTIFF/TIFF, .npy)",
        description="One streaming pass over the band files under FOLDER (uint8 / 255, uint16 / 65535, "
                    "float32 as stored; pixels outside a <name>.mask.tif/.npy left out). Under torchrun "
                    "each process reads its share of the files and the sums are added. Prints the "
                    "data.mean=... data.std=... overrides; a multiband run without them computes and "
                    "records the same values.")
    st.add_argument("folder", help="folder of .tif/.tiff/.npy images (recursive)")
    st.add_argument("--output", default=None, help="also write the statistics to this JSON file")
    st.add_argument("--limit", type=int, default=None, help="only the first N files (sorted)")
    st.add_argument("--no-progress", action="store_true")
    st.set_defaults(func=run_stats)
    q = kinds.add_parser(
        "shard", help="write WebDataset tar shards from an image folder",
        description="Pack the images under --input (class sub-folders give labels) into tar shards "
                    "of --shard-size samples in --output, plus index.json (per-shard counts). "
                    "Write at least (processes x loader workers) shards.")
    q.add_argument("--input", required=True, help="image folder (recursive)")
    q.add_argument("--output", required=True, help="empty folder for the shards")
    q.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    q.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    q.add_argument("--seed", type=int, default=0, help="shuffle seed of the sample order")
    q.add_argument("--no-shuffle", action="store_true", help="keep the sorted folder order")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinokit.data.streaming import write_shards

    if args.shard_size < 1:
        print(f"dinokit data shard: error: --shard-size must be >= 1, got {args.shard_size}")
        return 2
    try:
        paths = write_shards(args.input, args.output, shard_size=args.shard_size, prefix=args.prefix,
                             seed=None if args.no_shuffle else args.seed)
    except (FileExistsError, NotADirectoryError) as e:
        print(f"dinokit data shard: error: {e}")
        return 2
    print(f"written: {len(paths)} shard(s) in {args.output} ({paths[0].name} ... {paths[-1].name}) "
          f"and {args.output}/index.json")
    return 0


def run_stats(args: argparse.Namespace) -> int:

    import torch.distributed as dist

    from dinokit.data.multiband import band_statistics
    from dinokit.interop.staging import staged_file

    if args.limit is not None and args.limit < 1:
        print(f"dinokit data stats: error: --limit must be >= 1, got {args.limit}")
        return 2
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not dist.is_initialized()
    if launched:  # torchrun: each process reads its share of the files (CPU sums over gloo)
        dist.init_process_group("gloo")
    try:
        stats = band_statistics(args.folder, limit=args.limit, progress=not args.no_progress)
        rank = dist.get_rank() if dist.is_initialized() else 0
    finally:
        if launched:
            dist.destroy_process_group()
    if rank != 0:
        return 0
    print(f"{stats.images} images, {len(stats.mean)} bands, {stats.pixels} valid pixels per band")
    for i, (m, s) in enumerate(zip(stats.mean, stats.std)):
        print(f"  band {i}: mean {m:.6g}  std {s:.6g}")
    print(stats.overrides())
    if args.output:
        with staged_file(Path(args.output)) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(stats), indent=2))
        print(f"written: {args.output}")
    return 0
