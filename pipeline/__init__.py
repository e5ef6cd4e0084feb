"""Everything that touches samples, in three sub-packages that only meet at the shard format.

- ``effnetv2.pipeline.format``: the shard format (tar + DALI index + ``_info.json``), JPEG headers and
  atomic file writes; shared by both sides, imports neither torch nor DALI.
- ``effnetv2.pipeline.sharder``: offline, datasets on disk -> shard sets (``effnetv2 shard``).
- ``effnetv2.pipeline.loaders``: online, shard sets -> augmented device batches for one stage
  (DALI on a GPU or CPU, or the OpenCV backend where DALI does not exist).
"""
