"""``effnetv2 shard``: turn a dataset on disk into a WebDataset shard set.

    effnetv2 shard imagefolder ~/data/flowers shards/flowers --val 500
    effnetv2 shard imagenet /data/ILSVRC2012 shards/in1k --minival 25000 --max-side 512
    effnetv2 shard imagenet21k /data/fall11 shards/in21k --release fall11 --shard-bytes 512M
    effnetv2 shard imagenet /data/ILSVRC2012 /shared/in1k --part 0/4   # on 4 machines: 0/4 .. 3/4
    effnetv2 shard merge /shared/in1k                                   # then once, anywhere
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from effnetv2.recipes.cli.args import positive_int

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def _bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 500M or 2G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output folder for the shard set")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    size.add_argument("--shard-bytes", type=_bytes, help="bytes per shard instead, e.g. 512M")
    p.add_argument("--max-side", type=positive_int, help="downscale images whose longer side exceeds this")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of converted images (default 95)")
    p.add_argument("--workers", type=positive_int, help="worker processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle and held-out splits")
    p.add_argument("--part", default="0/1", help="write part i of n (0-based) of the shard set, e.g. 0/4")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run (same inputs and options)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    p = sub.add_parser("imagefolder", help="one folder per class (or train/ val/ test/ of class folders)")
    p.add_argument("src", type=Path, help="the dataset folder")
    _common(p)
    p.add_argument("--val", type=int, default=0, help="hold out N training images as a val split")
    p = sub.add_parser("imagenet", help="ILSVRC2012: train/<wnid>/, flat val/ and the devkit ground truth")
    p.add_argument("src", type=Path, help="folder with train/ and val/ (or the Kaggle download, with ILSVRC/Data/CLS-LOC)")
    _common(p)
    p.add_argument("--minival", type=int, default=0, help="hold out N training images as split 'minival'")
    p.add_argument("--val-labels", type=Path, help="LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt")
    p.add_argument("--meta", type=Path, help="the devkit's meta.mat (with the ground_truth.txt)")
    p = sub.add_parser("imagenet21k", help="ImageNet-21k: one <wnid>.tar (or folder) per synset, multi-label")
    p.add_argument("src", type=Path, help="folder of <wnid>.tar files or <wnid>/ folders")
    _common(p)
    p.add_argument("--release", required=True, choices=["fall11", "winter21"])
    p.add_argument("--val", type=int, default=100_000, help="held-out val images (default 100000, as the paper)")
    p.add_argument("--labels", type=Path, help="extra labels: lines '<image> <wnid> [<wnid> ...]'")
    p = sub.add_parser("merge", help="write the manifest of a set written with --part i/n on several machines")
    p.add_argument("out", type=Path)


def run(args: argparse.Namespace) -> int:
    from effnetv2.pipeline.sharder import sources
    from effnetv2.pipeline.sharder.writer import merge_parts, parse_part, summary, write_shard_set, write_tsv

    try:
        if args.source == "merge":
            print(summary(merge_parts(args.out)))
            return 0
        parse_part(args.part)  # fail before a long listing, not after
        workers = args.workers or len(os.sched_getaffinity(0))
        if args.source == "imagefolder":
            listing = sources.imagefolder(args.src, val=args.val, seed=args.seed)
        elif args.source == "imagenet":
            listing = sources.imagenet(args.src, minival=args.minival, seed=args.seed,
                                       val_labels=args.val_labels, meta=args.meta)
        else:
            listing = sources.imagenet21k(args.src, release=args.release, val=args.val, seed=args.seed,
                                          labels=args.labels, workers=workers, progress=not args.no_progress)
        for note in listing.notes:
            print(f"effnetv2 shard: note: {note}", file=sys.stderr)
        shard_set = write_shard_set(
            args.out, listing.splits, listing.classes, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
            seed=args.seed, quality=args.quality, max_side=args.max_side, workers=workers,
            extra_info=listing.info, multilabel=listing.multilabel, part=args.part, resume=args.resume,
            listing_rejected=listing.rejected, progress=not args.no_progress)
        if listing.duplicates:
            write_tsv(args.out / "duplicates.tsv", ("merged", "kept"), listing.duplicates)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"effnetv2 shard: error: {e}", file=sys.stderr)
        return 1
    if shard_set is None:
        print(f"effnetv2 shard: part {args.part} done; once every part is done run 'effnetv2 shard merge {args.out}'")
    else:
        print(summary(shard_set))
    return 0
