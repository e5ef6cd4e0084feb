"""The DALI index of a shard (format v1.2): the one reader and writer of it.

A first line ``v1.2 <num_samples>``, then one line per sample of ``<ext> <offset> <size> <name>``
quadruples, one per member, where ``offset`` is where the member's data starts in the tar (one
512-byte header block after the member's header). DALI's ``fn.readers.webdataset`` reads the same
file; the loaders and :func:`~effnetv2.pipeline.format.shards.iter_samples` read it here.

Shards come from outside, so an index is checked before any offset in it is used: a regular file of
bounded size, integer fields, offsets inside the tar and block-aligned, every sample with its image
and class members. Each error names the file and the line.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atomic

VERSION = "v1.2"
TAR_BLOCK = 512
EXTENSIONS = ("jpg", "cls", "labels")  # the members effnetv2 reads; others are allowed and ignored
_MAX_LINE = 64 + 4 * 160  # a sample line of 4 members with long names: far below this
_REQUIRED = ("jpg", "cls")


def index_path(tar_path: str | Path) -> Path:
    """The DALI index file that belongs to a shard: same name, ``.idx`` instead of ``.tar``."""
    return Path(tar_path).with_suffix(".idx")


def write_index(path: str | Path, lines: list[str]) -> Path:
    """Write an index from its sample lines (``ext offset size name`` quadruples), atomically."""
    text = f"{VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)
    with atomic.atomic_open(path, "w", encoding="ascii") as f:
        f.write(text)
    return Path(path)


@dataclass(frozen=True)
class Index:
    """One shard's index as arrays: per extension in :data:`EXTENSIONS` an (N, 2) int64 array of
    (data offset, size), (0, 0) where a sample lacks that member."""

    tar: Path
    members: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.members["jpg"])

    def samples(self) -> list[dict[str, tuple[int, int]]]:
        """Per sample, extension -> (data offset, size) of the members it has."""
        return [{ext: (int(a[i, 0]), int(a[i, 1])) for ext, a in self.members.items() if a[i, 1] > 0}
                for i in range(len(self))]


def read_index(tar_path: str | Path, expected: int | None = None) -> Index:
    """Parse and check the index of ``tar_path``; ``expected`` is the manifest's sample count for it."""
    tar_path = Path(tar_path)
    path = index_path(tar_path)
    lines = _read_lines(path, tar_path)
    head = lines[0].split(" ") if lines else []
    if len(head) != 2 or head[0] != VERSION or not head[1].isdigit():
        raise ValueError(f"{path}: not a DALI {VERSION} index (first line {lines[0][:40] if lines else ''!r})")
    count = int(head[1])
    if count != len(lines) - 1:
        raise ValueError(f"{path}: the header announces {count} samples but {len(lines) - 1} lines follow")
    if expected is not None and count != expected:
        raise ValueError(f"{path}: {count} samples, but the shard set's manifest says {expected} for "
                         f"{tar_path.name}; the shard set is inconsistent (re-shard, or fix _info.json)")
    tar_size = tar_path.stat().st_size
    out = {ext: np.zeros((count, 2), np.int64) for ext in EXTENSIONS}
    for row, line in enumerate(lines[1:]):
        fields = line.split(" ")
        if len(fields) % 4 or not fields[0]:
            raise ValueError(f"{path}: line {row + 2} is not a list of 'ext offset size name' entries")
        for k in range(0, len(fields), 4):
            ext, off, size = fields[k], fields[k + 1], fields[k + 2]
            if not (off.isdigit() and size.isdigit()):
                raise ValueError(f"{path}: line {row + 2}: offset {off!r} and size {size!r} of member "
                                 f"{ext!r} must be non-negative integers")
            off_i, size_i = int(off), int(size)
            if off_i + size_i > tar_size:
                raise ValueError(f"{tar_path}: its index (line {row + 2}) puts member {ext!r} at {off_i}+{size_i}, "
                                 f"past the end of the file ({tar_size} bytes): the shard is truncated")
            if off_i < TAR_BLOCK or off_i % TAR_BLOCK:
                raise ValueError(f"{path}: line {row + 2}: member {ext!r} at offset {off_i} is not where a tar "
                                 f"member's data can start (a multiple of {TAR_BLOCK}, after its header)")
            if ext in out:
                out[ext][row] = (off_i, size_i)
    for ext in _REQUIRED:
        missing = np.flatnonzero(out[ext][:, 1] == 0)
        if len(missing):
            raise ValueError(f"{path}: sample {int(missing[0])} (line {int(missing[0]) + 2}) has no {ext!r} "
                             f"member")
    return Index(tar_path, out)


def _read_lines(path: Path, tar_path: Path) -> list[str]:
    """The index's lines, refusing anything but a regular file of plausible size (a symlink to
    ``/dev/zero`` would otherwise be read without end)."""
    try:
        st = os.stat(path)
        tar_st = os.stat(tar_path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the DALI index of {tar_path.name} ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode) or not stat.S_ISREG(tar_st.st_mode):
        raise ValueError(f"{path}: the index and its shard must be regular files")
    limit = 64 + (tar_st.st_size // TAR_BLOCK + 1) * _MAX_LINE  # at most one sample per tar block
    if st.st_size > limit:
        raise ValueError(f"{path}: {st.st_size} bytes is far more than an index of {tar_path.name} can be")
    try:
        with open(path, "rb") as f:
            text = f.read(limit + 1).decode("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the DALI index of {tar_path.name} ({e})") from e
    return text.splitlines()
