"""Training and everything after it, in sub-packages that depend one way: cli -> catalog -> engine.

- ``effnetv2.recipes.engine``: the training engine: config, progressive plan (Algorithm 1), LR
  schedules, TF-RMSProp, EMA, the step (CUDA graphs), checkpoints, torchrun/DDP, the trainer's parts.
- ``effnetv2.recipes.catalog``: the recipes (demo, in1k, in21k-pretrain, in1k-finetune, transfer),
  each a function returning a ``TrainConfig``.
- ``effnetv2.recipes.cli``: the ``effnetv2`` command line (shard, plan, train, doctor, ...).
"""
