"""``dinokit data shard --input FOLDER --output DIR``: WebDataset tar shards from an image folder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare data (write WebDataset shards for streaming)")
    kinds = p.add_subparsers(dest="data_command", metavar="{shard}", required=True)
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
