"""The recipes: one module per recipe, each with ``config(model) -> TrainConfig`` and optionally
``prepare(cfg, args)`` and ``finish(cfg, result)`` (see :mod:`effnetv2.recipes.cli.train`)."""

NAMES = ("in1k", "in21k-pretrain", "in1k-finetune", "transfer", "demo")
