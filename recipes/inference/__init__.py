"""After training: load a trained run (:mod:`.run`: checkpoint + config, EMA or raw weights, class
names), predict on image files (:mod:`.predict`), hand the model to other tools (:mod:`.export`: timm,
safetensors, ONNX, TorchScript). Evaluation on a shard set is the trainer's own
(:mod:`effnetv2.recipes.engine.evaluate`).

Library code only; the ``effnetv2 eval|predict|export`` commands live in ``effnetv2.recipes.cli``.
"""
