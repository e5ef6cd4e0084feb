"""Everything that touches samples: sharding datasets, and turning shards into augmented batches.

The loaders import torch, so they are loaded on first use: the sharder and its workers stay light.
"""

from .shards import MANIFEST, ShardSet, ShardWriter, read_shard_set

_LAZY = {"BatchSpec": "loader", "EvalLoader": "loader", "TrainLoader": "loader", "build_eval_loader": "loader",
         "build_train_loader": "loader", "SampleTable": "sampler", "epoch_order": "sampler"}

__all__ = ["MANIFEST", "ShardSet", "ShardWriter", "read_shard_set", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
