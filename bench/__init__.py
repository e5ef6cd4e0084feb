"""imgs/sec measurements behind the project's speed claims (``effnetv2 bench``).

``corpus`` makes an ImageNet-like shard set; ``loader``, ``step``, ``e2e`` and ``shard`` measure; ``peers``
holds the loaders users pick instead; ``timing`` is the one harness; ``report`` writes table, JSON, PNG.
Module tops import nothing heavy, so that ``peers`` and ``step`` also run in another interpreter.
"""
