"""``effnetv2 plan``: print a progressive-learning plan (Algorithm 1) without training anything.

    effnetv2 plan --model s --preset paper --epochs 350
"""

from __future__ import annotations

import argparse
import sys

from effnetv2.recipes.cli.args import non_negative_int, positive_float, positive_int
from effnetv2.recipes.engine.plan import PRESETS, REGIMENS, format_plan, make_plan

IMAGENET_TRAIN = 1_281_167


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="s", help=f"one of {', '.join(REGIMENS)} (or efficientnetv2-NAME)")
    parser.add_argument("--preset", default="official", choices=PRESETS)
    parser.add_argument("--epochs", type=positive_float, default=350.0)
    parser.add_argument("--stages", type=positive_int, default=4, help="number of stages M (default 4)")
    parser.add_argument("--batch-size", type=positive_int, default=4096, help="global batch size")
    parser.add_argument("--round-to", type=int, default=1, choices=(1, 8, 16, 32),
                        help="round image sizes to a multiple of this")
    parser.add_argument("--resize-every", type=positive_float, default=10.0,
                        help="random-resize preset: epochs between size draws")
    parser.add_argument("--seed", type=int, default=0, help="random-resize preset: seed of the draws")
    parser.add_argument("--train-samples", type=non_negative_int, default=IMAGENET_TRAIN,
                        help="training-set size for the steps column (0: no steps column)")


def run(args: argparse.Namespace) -> int:
    try:
        stages = make_plan(args.model, args.preset, epochs=args.epochs, batch_size=args.batch_size,
                           num_stages=args.stages, round_to=args.round_to, resize_every=args.resize_every,
                           seed=args.seed)
    except ValueError as e:
        print(f"effnetv2 plan: {e}", file=sys.stderr)
        return 2
    spe = args.train_samples // args.batch_size if args.train_samples else None
    print(f"plan: model {args.model}, preset {args.preset}, {args.epochs:g} epochs, {len(stages)} stages, "
          f"batch {args.batch_size}" + (f", {spe} steps/epoch" if spe else ""))
    print(format_plan(stages, spe))
    return 0
