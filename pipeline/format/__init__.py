"""The shard format every part of effnetv2 agrees on: the sharder writes it, the loaders read it."""

from .shards import MANIFEST, ShardSet, ShardWriter, Split, read_shard_set

__all__ = ["MANIFEST", "ShardSet", "ShardWriter", "Split", "read_shard_set"]
