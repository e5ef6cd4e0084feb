"""``effnetv2 train RECIPE [--set key=value ...] [--resume | --fresh] [--out DIR] [--data DIR]``.

A recipe is a module ``effnetv2.recipes.<name>`` (dashes become underscores) with

* ``config(model: str | None = None) -> TrainConfig`` (required): the recipe's hyper-parameters;
  ``model`` is the ``--set model=...`` value, so model-dependent values (fine-tune size) follow it;
* ``prepare(cfg, args) -> TrainConfig`` (optional): runs before training, e.g. to make the shard set
  (on every rank under torchrun: keep it idempotent, or prepare before launching);
* ``finish(cfg, result) -> None`` (optional): runs after training on rank 0, e.g. a summary or a chart.

Every recipe module also runs as ``python -m effnetv2.recipes.<name> ...`` with the same options, and
multi-process as ``torchrun --nproc_per_node N -m effnetv2.recipes.cli.train RECIPE ...``. On a CPU-only
machine ``cpu_processes`` > 1 does that launch itself: it prepares the data once, then runs torchrun
(``torch.distributed.run --standalone``) on the same arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from pathlib import Path

from effnetv2.recipes.catalog import NAMES as RECIPES
from effnetv2.recipes.engine import checkpoint
from effnetv2.recipes.engine.config import TrainConfig, apply_overrides, format_config, validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help=f"one of {', '.join(RECIPES)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable), e.g. --set model=efficientnetv2-m")
    parser.add_argument("--data", help="shard set folder (sets data=)")
    parser.add_argument("--out", help="run folder for checkpoints and metrics (sets out=)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue from the newest valid checkpoint in the run folder")
    group.add_argument("--fresh", action="store_true",
                       help="delete the run folder's checkpoints and metrics and start over")
    parser.add_argument("--make-data", action="store_true",
                        help="let the recipe make its data set in --data when it is not there (the demo shards "
                             "Fashion-MNIST; without this it does so only in its own default folder)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and plan, then stop (nothing is prepared or trained)")


def load_recipe(name: str):
    module_name = f"effnetv2.recipes.catalog.{name.replace('-', '_')}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise SystemExit(f"effnetv2 train: unknown recipe {name!r}; recipes: {', '.join(RECIPES)}") from None


def resolve_config(args: argparse.Namespace, recipe=None) -> TrainConfig:
    """The recipe's config with --data/--out/--resume and then every --set applied, type-checked."""
    recipe = recipe or load_recipe(args.recipe)
    model = None
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key.strip() == "model":
            model = value.strip()
    cfg = recipe.config(model) if model else recipe.config()
    items = []
    if args.data:
        items.append(f"data={args.data}")
    if args.out:
        items.append(f"out={args.out}")
    if args.resume:
        items.append("resume=true")
    if args.fresh:
        items.append("resume=false")
    return apply_overrides(cfg, items + list(args.overrides))


def clear_run(out: Path) -> None:
    """Remove what a training run writes in ``out`` (checkpoints, metrics, config, TensorBoard)."""
    for path in checkpoint.list_checkpoints(out):
        path.unlink(missing_ok=True)
    for name in ("metrics.jsonl", "config.json", "classes.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)


_LAUNCHED = "EFFNETV2_LAUNCHED"  # set for the ranks that launch_cpu_ranks() starts: they skip prepare()


def cpu_ranks(cfg: TrainConfig) -> int:
    """How many torchrun processes this command should start: > 1 only on a CPU, outside torchrun."""
    from effnetv2.recipes.engine.distributed import resolve_device

    if "WORLD_SIZE" in os.environ or resolve_device(cfg.device).type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0))
    return min(cfg.cpu_processes or cores, cores)


def launch_cpu_ranks(args: argparse.Namespace, n: int) -> int:
    """Run this command again as ``n`` one-machine torchrun ranks; their exit status is ours."""
    from effnetv2.recipes.engine.distributed import run_local_ranks

    argv = [args.recipe]
    for flag in ("data", "out"):
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    argv += ["--resume"] if args.resume else ["--set", "resume=false"] if args.fresh else []
    for item in args.overrides:
        argv += ["--set", item]
    print(f"effnetv2 train: {n} CPU processes (torchrun --standalone --nproc_per_node {n}; "
          f"--set cpu_processes=1 for one)", flush=True)
    return 0 if run_local_ranks(n, "effnetv2.recipes.cli.train", argv, env={_LAUNCHED: "1"}) == 0 else 1


def run(args: argparse.Namespace) -> int:
    """Exit 2 for a config that cannot run (one line naming the field), 1 for a run that failed."""
    from effnetv2.recipes.engine import distributed
    from effnetv2.recipes.engine.plan import format_plan
    from effnetv2.recipes.engine.trainer import NonFiniteLoss, build_plan, train

    recipe = load_recipe(args.recipe)
    try:
        cfg = resolve_config(args, recipe)
        validate(cfg, inputs=not args.dry_run)
        plan = build_plan(cfg)
    except ValueError as e:
        print(f"effnetv2 train: {e}", file=sys.stderr)
        return 2
    if args.dry_run:  # after validation, before prepare(): a dry run checks everything and makes nothing
        print(f"effnetv2 train {cfg.recipe}: resolved config\n{format_config(cfg)}")
        print(format_plan(plan))
        return 0
    if args.fresh:
        clear_run(Path(cfg.out_dir()))
    try:
        if hasattr(recipe, "prepare") and not os.environ.get(_LAUNCHED):
            cfg = recipe.prepare(cfg, args)
        if (ranks := cpu_ranks(cfg)) > 1:
            return launch_cpu_ranks(args, ranks)
        result = train(cfg)
    except ValueError as e:  # bad data or files met while building the run: nothing was trained
        print(f"effnetv2 train: {e}", file=sys.stderr)
        distributed.shutdown()
        return 2
    except (NonFiniteLoss, FileExistsError, FileNotFoundError, RuntimeError) as e:  # raised on every rank alike
        print(f"effnetv2 train: {e}", file=sys.stderr)
        distributed.shutdown()
        return 1
    distributed.shutdown()
    if hasattr(recipe, "finish") and int(os.environ.get("RANK", "0")) == 0:
        recipe.finish(cfg, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    from effnetv2.recipes.cli.main import command

    return command("train", argv)


def recipe_main(name: str) -> int:
    """``python -m effnetv2.recipes.<name> [options]``: the same as ``effnetv2 train <name> [options]``."""
    return main([name, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
