"""effnetv2: EfficientNetV2 training in PyTorch that treats input loading as the bottleneck.

Sub-packages, in the order samples flow:

- ``effnetv2.pipeline``: datasets -> WebDataset shards -> augmented batches (DALI or albumentations).
- ``effnetv2.model``: the EfficientNetV2 family and its public weights.
- ``effnetv2.recipes``: the progressive plan, the training step and loop, checkpoints, the CLI.
- ``effnetv2.bench``: imgs/sec measurements of each of the above.
"""

__version__ = "0.1.0"
