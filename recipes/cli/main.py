"""The ``effnetv2`` command line.

Each subcommand lives in the module that owns its work and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen module is imported, so
``effnetv2 shard`` does not pay for importing torch and ``effnetv2 --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "shard": ("effnetv2.recipes.cli.shard", "turn a dataset on disk into WebDataset shards"),
    "plan": ("effnetv2.recipes.cli.plan", "print the progressive-learning plan (Algorithm 1)"),
    "train": ("effnetv2.recipes.cli.train", "run a training recipe (demo, in1k, in21k-pretrain, ...)"),
    "bench": ("effnetv2.bench.cli", "measure imgs/sec: loader, step, end to end, sharding"),
    "doctor": ("effnetv2.recipes.cli.doctor", "report what this machine can run"),
    "eval": ("effnetv2.recipes.cli.eval", "score a trained run on a shard set (top-1/5, mAP, per class)"),
    "predict": ("effnetv2.recipes.cli.predict", "top classes of image files from a trained run"),
    "export": ("effnetv2.recipes.cli.export", "export a trained run: timm, safetensors, ONNX, TorchScript"),
    "search": ("effnetv2.recipes.cli.search", "training-aware architecture search (paper §3.3) on this machine"),
    "scale": ("effnetv2.recipes.cli.scale", "grow a base network into a family (compound scaling, V2 rules)"),
}


def _usage() -> str:
    lines = ["usage: effnetv2 COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'effnetv2 COMMAND --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"effnetv2: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"effnetv2 {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


def command(name: str, argv: list[str] | None = None) -> int:
    """One command as its own program (``python -m effnetv2.recipes.cli.eval ...``, what torchrun runs):
    the same as ``effnetv2 NAME ...``."""
    return main([name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
