"""``effnetv2 bench corpus|loader|step|e2e|shard``: the project's speed claims, from one command.

Each measurement subcommand lives in its own module (``loader``, ``step``, ``e2e``, ``shard``) exposing
``add_arguments(parser)`` and ``run(args) -> Report``; this module adds the options they share and
publishes the report: a printed table, ``OUT/{bench}-{time}.json`` and ``.png`` (see
:mod:`effnetv2.bench.report`). ``corpus`` makes the ImageNet-like shard set the others read by default.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

from .report import DEFAULT_OUT, publish

BENCHES = {
    "loader": "train loaders (ours: DALI GPU/CPU, OpenCV) beside torchvision/albumentations/decode",
    "step": "training-step imgs/s per model on synthetic data (eager/compiled/CUDA graph, fp32/bf16), vs timm",
    "e2e": "the trainer fed by the real loader vs synthetic data, per stage; stage-switch time",
    "shard": "sharding imgs/s with and without conversion, vs a raw copy of the same bytes",
    "memory": "training-step memory: the memory model's prediction vs the bytes a real step allocates",
    "progressive": "one recipe in fixed/progressive/adaptive/random-resize arms: accuracy vs time (Tables 12-13)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{corpus," + ",".join(BENCHES) + "}")
    corpus = sub.add_parser("corpus", help="write a reproducible ImageNet-like JPEG shard set")
    corpus.add_argument("out", type=Path, help="new folder for the shard set")
    corpus.add_argument("--n", type=int, default=2000, help="training images (default 2000)")
    corpus.add_argument("--val", type=int, default=0, help="validation images (default none)")
    corpus.add_argument("--classes", type=int, default=1000, help="number of classes (default 1000)")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--shard-size", type=int, default=256)
    corpus.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    for name, help_ in BENCHES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(f"effnetv2.bench.{name}").add_arguments(p)
        p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                       help=f"folder for the JSON and PNG of this run (default {DEFAULT_OUT}/)")
        p.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads (default: all cores)")


def run(args: argparse.Namespace) -> int:
    if args.bench == "corpus":
        from .corpus import make_corpus

        shard_set = make_corpus(args.out, args.n, val=args.val, num_classes=args.classes, seed=args.seed,
                                shard_size=args.shard_size, workers=args.workers)
        counts = ", ".join(f"{name} {s.num_samples}" for name, s in shard_set.splits.items())
        print(f"effnetv2 bench corpus: wrote {counts} images ({shard_set.num_classes} classes) to {args.out}")
        return 0
    import torch

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    report = importlib.import_module(f"effnetv2.bench.{args.bench}").run(args)
    publish(report, args.out)
    return 0 if all(r.status != "error" for r in report.rows) else 1
