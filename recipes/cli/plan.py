"""``effnetv2 plan``: print a progressive-learning plan (Algorithm 1) without training anything.

    effnetv2 plan --model s --preset paper --epochs 350
    effnetv2 plan --model s --preset official --memory 80GiB     # each stage's batch from memory

``--memory`` plans what ``--set batch_plan=memory`` trains: per stage the largest per-device batch whose
counted step memory fits, the steps at that batch and the LR by the linear rule
(:mod:`effnetv2.recipes.engine.batch_plan`). A given size needs no GPU; ``auto`` reads the GPU's.
"""

from __future__ import annotations

import argparse
import sys

from effnetv2.recipes.cli.args import non_negative_int, positive_float, positive_int
from effnetv2.recipes.engine.plan import PRESETS, REGIMENS, format_plan, make_plan, stage_spans

IMAGENET_TRAIN = 1_281_167
PLAN_AMP = ("bf16", "fp16", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="s", help=f"one of {', '.join(REGIMENS)} (or efficientnetv2-NAME)")
    parser.add_argument("--preset", default="official", choices=PRESETS)
    parser.add_argument("--epochs", type=positive_float, default=350.0)
    parser.add_argument("--stages", type=positive_int, default=4, help="number of stages M (default 4)")
    parser.add_argument("--batch-size", type=positive_int, default=4096,
                        help="global batch size (with --memory: the reference batch of the LR schedule's epochs)")
    parser.add_argument("--round-to", type=int, default=1, choices=(1, 8, 16, 32),
                        help="round image sizes to a multiple of this")
    parser.add_argument("--resize-every", type=positive_float, default=10.0,
                        help="random-resize preset: epochs between size draws")
    parser.add_argument("--seed", type=int, default=0, help="random-resize preset: seed of the draws")
    parser.add_argument("--train-samples", type=non_negative_int, default=IMAGENET_TRAIN,
                        help="training-set size for the steps column (0: no steps column)")
    parser.add_argument("--memory", default=None,
                        help="plan each stage's batch for this much memory per device, e.g. 80GiB (auto: the "
                             "GPU's free memory); default: every stage at --batch-size")
    parser.add_argument("--max-batch", type=non_negative_int, default=0,
                        help="with --memory: cap on a stage's global batch (0: only the data's)")
    parser.add_argument("--amp", default="bf16", choices=PLAN_AMP,
                        help="with --memory: the step's precision (default bf16: what amp=auto trains with on "
                             "a GPU that has it)")
    parser.add_argument("--world-size", type=positive_int, default=1,
                        help="with --memory: devices (DDP ranks); the budget is per device")
    parser.add_argument("--num-classes", type=positive_int, default=1000, help="with --memory: classifier size")


def run(args: argparse.Namespace) -> int:
    try:
        stages = make_plan(args.model, args.preset, epochs=args.epochs, batch_size=args.batch_size,
                           num_stages=args.stages, round_to=args.round_to, resize_every=args.resize_every,
                           seed=args.seed)
        if args.memory is not None:
            return _run_memory(args, stages)
    except ValueError as e:
        print(f"effnetv2 plan: {e}", file=sys.stderr)
        return 2
    spe = args.train_samples // args.batch_size if args.train_samples else None
    print(f"plan: model {args.model}, preset {args.preset}, {args.epochs:g} epochs, {len(stages)} stages, "
          f"batch {args.batch_size}" + (f", {spe} steps/epoch" if spe else ""))
    print(format_plan(stages, spe))
    return 0


def _run_memory(args: argparse.Namespace, stages) -> int:
    """The plan with every stage's batch planned for ``--memory`` (what the trainer does)."""
    import torch

    from effnetv2.model import get_config
    from effnetv2.model.memory import fmt_bytes
    from effnetv2.recipes.engine.batch_plan import lr_rule, plan_stage_batches, run_budget
    from effnetv2.recipes.engine.config import TrainConfig
    from effnetv2.recipes.engine.step import AMP

    defaults = TrainConfig()  # margin, layout, LR per 256 and ramp: the trainer's defaults
    model = get_config(f"efficientnetv2-{str(args.model).lower().removeprefix('efficientnetv2-')}")
    budget = run_budget(args.memory, torch.device("cuda" if torch.cuda.is_available() else "cpu"), option="--memory")
    stages, memory = plan_stage_batches(
        stages, model=model, num_classes=args.num_classes, budget=budget, amp=AMP[args.amp],
        channels_last=defaults.channels_last, tf_padding=defaults.tf_padding, world_size=args.world_size,
        max_batch=args.max_batch, num_samples=args.train_samples or None, margin=defaults.memory_margin)
    spe = args.train_samples // args.batch_size if args.train_samples else 0
    spans = None
    if spe:
        total = int(sum(s.epochs for s in stages) * spe + 1e-9)
        spans = stage_spans(stages, total, num_samples=args.train_samples, batch_size=args.batch_size,
                            world_size=args.world_size)
    print(f"plan: model {model.name}, preset {args.preset}, {args.epochs:g} epochs, {len(stages)} stages, "
          f"batches planned for {fmt_bytes(budget)} per device x {args.world_size} device(s), {args.amp}, "
          f"{defaults.memory_margin:.0%} margin; batch: global, memory: predicted per device")
    print(format_plan(stages, spans=spans, lr_per_256=defaults.lr_per_256,
                      memory=[fmt_bytes(m.total(s.batch_size // args.world_size)) for m, s in zip(memory, stages)]))
    print(lr_rule(defaults.lr_per_256, args.batch_size, spe, defaults.lr_ramp_epochs))
    return 0
