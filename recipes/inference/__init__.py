"""After training: hand a model to other tools (:mod:`.export`: timm, safetensors, ONNX, TorchScript).

Library code only; the ``effnetv2`` commands that use it live in ``effnetv2.recipes.cli``.
"""
