"""``effnetv2 search``: the training-aware architecture search of paper §3.3 on the machine at hand.

    effnetv2 search                                      # 20 samples around the demo model, 0.5 epochs each
    effnetv2 search --backbone runs/search/best.json --out runs/search2 --rank-check 3

Every candidate trains with a recipe's config (default ``demo``: its data, batch, optimiser, schedule)
as one short stage at the proxy size; ``--set key=value`` changes the recipe's config as in
``effnetv2 train``. Killed and rerun with the same options, it continues where it stopped. See
:mod:`effnetv2.recipes.search.runner` for what is trained and how step time is measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effnetv2.model.search import V_PARAMS, W_STEP_TIME


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="demo", help="the recipe whose config every candidate trains with (demo)")
    p.add_argument("--backbone", default=None,
                   help="model name or config file to search around (default: the recipe's model)")
    p.add_argument("--data", help="shard set folder (default: the recipe's, made by its prepare step if missing)")
    p.add_argument("--out", default="runs/search", help="search folder: results.jsonl, top.md, search.png, "
                   "best.json, candidates/ (default runs/search)")
    p.add_argument("--samples", type=int, default=20, help="random candidates besides the backbone (default 20; "
                   "rerun with more to extend the same list)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; also every candidate's training seed")
    p.add_argument("--epochs", type=float, default=0.5, help="proxy epochs per candidate (default 0.5)")
    p.add_argument("--image-size", type=int, default=None,
                   help="proxy image size (default: the middle of the recipe's size range)")
    p.add_argument("--w", type=float, default=W_STEP_TIME, help=f"step-time exponent (default {W_STEP_TIME})")
    p.add_argument("--v", type=float, default=V_PARAMS, help=f"parameter exponent (default {V_PARAMS})")
    p.add_argument("--top-k", type=int, default=10, help="rows of the table (default 10)")
    p.add_argument("--layer-delta", type=int, default=2,
                   help="layers per stage searched within the backbone's +- this (default 2)")
    p.add_argument("--rank-check", type=int, default=0, metavar="K",
                   help="then retrain the top-K and K random candidates for longer and report Kendall tau")
    p.add_argument("--rank-factor", type=float, default=3.0, help="rank check: x the proxy epochs (default 3)")
    p.add_argument("--time-warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument("--time-reps", type=int, default=5, help="timed repetitions, median taken (default 5)")
    p.add_argument("--time-per-rep", type=int, default=2, help="steps per repetition (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the recipe's config, as in effnetv2 train (not model: use --backbone)")


def run(args: argparse.Namespace) -> int:
    from effnetv2.model import get_config
    from effnetv2.model.config_file import ConfigFileError
    from effnetv2.recipes.cli.train import load_recipe
    from effnetv2.recipes.engine.config import apply_overrides
    from effnetv2.recipes.search import SearchOptions, run_search
    from effnetv2.recipes.search.results import SearchFileError

    def fail(msg: str) -> int:
        print(f"effnetv2 search: {msg}", file=sys.stderr)
        return 2

    if any(item.partition("=")[0].strip() == "model" for item in args.overrides):
        return fail("--set model=... is not how to pick the network: pass --backbone NAME|FILE")
    if args.samples < 0 or args.epochs <= 0 or args.top_k < 1 or args.rank_check < 0:
        return fail("need --samples >= 0, --epochs > 0, --top-k >= 1 and --rank-check >= 0")
    recipe = load_recipe(args.recipe)
    try:
        base = recipe.config()
        backbone = get_config(args.backbone or base.model)
        base = apply_overrides(base, ([f"data={args.data}"] if args.data else []) + list(args.overrides))
        if not args.data and hasattr(recipe, "prepare"):
            base = recipe.prepare(base, args)  # the recipe's own data step: reuses a complete shard set
        opts = SearchOptions(samples=args.samples, seed=args.seed, epochs=args.epochs, image_size=args.image_size,
                             w=args.w, v=args.v, top_k=args.top_k, layer_delta=args.layer_delta,
                             rank_check=args.rank_check, rank_factor=args.rank_factor, time_warmup=args.time_warmup,
                             time_reps=args.time_reps, time_per_rep=args.time_per_rep)
        run_search(base, backbone, Path(args.out), opts, settings_extra={"overrides": sorted(args.overrides)})
    except (ValueError, SearchFileError, ConfigFileError, FileNotFoundError) as e:
        return fail(str(e))
    return 0


def main(argv: list[str] | None = None) -> int:
    from effnetv2.recipes.cli.main import command

    return command("search", argv)


if __name__ == "__main__":
    sys.exit(main())
