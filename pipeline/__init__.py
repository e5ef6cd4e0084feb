"""Everything that touches samples: sharding datasets, and turning shards into augmented batches."""

from .shards import MANIFEST, ShardSet, ShardWriter, read_shard_set

__all__ = ["MANIFEST", "ShardSet", "ShardWriter", "read_shard_set"]
