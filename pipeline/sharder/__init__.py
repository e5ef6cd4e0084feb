"""Offline: datasets on disk (ImageFolder, ImageNet-1k, ImageNet-21k, Fashion-MNIST) -> shard sets.

Plan, write and merge live in :mod:`.writer`; the dataset listings in :mod:`.sources`; the per-image
copy/convert/reject rule in :mod:`.images`. Nothing here imports torch.
"""

from .writer import SourceItem, TarMember, merge_parts, write_shard_set

__all__ = ["SourceItem", "TarMember", "merge_parts", "write_shard_set"]
