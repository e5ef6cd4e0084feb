"""Random access to the samples of a shard set, and the order in which each rank reads them.

Why random access instead of ``fn.readers.webdataset`` (or webdataset's streaming reader): a streaming
reader walks shards one after another and shuffles only inside a buffer, so it cannot

* start in the middle of an epoch at an exact sample (resume, progressive stage switches),
* give a full global shuffle per epoch (a buffer of 1024 over class-sorted shards gives batches of one
  or two classes; shard-order shuffling only helps so much),
* give every rank exactly the same number of samples (ranks that read whole shards get unequal counts
  and DDP hangs on the last step).

The shard format makes random access cheap: every tar has a DALI index with the byte offset and size of
each member, so a :class:`SampleTable` parses the indexes once into numpy arrays and reads a sample with
one ``os.pread`` at its offset. No tar header is parsed at run time. Not a memory map: a shard truncated
under a running loader makes a read of a mapped page past the new end a SIGBUS that kills the process
without a word, where a short ``pread`` is an error naming the shard (the copy costs about 2% of the
sample's decode). The tars stay valid webdataset
shards (the sharder's tests read them with ``fn.readers.webdataset``).

:func:`epoch_order` is the single source of truth for which sample a rank sees at which step: a global
permutation seeded by ``(seed, epoch)``, dealt to ranks by stride (rank ``r`` gets positions
``r, r+W, r+2W, ...``), so the per-rank sequence does not depend on the batch size and a loader can
resume at any sample position, also with another batch size after a stage switch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effnetv2.pipeline.format.index import TAR_BLOCK, read_index
from effnetv2.pipeline.format.shards import ShardSet, read_shard_set


class CorruptSampleWarning(UserWarning):
    """A sample could not be decoded; the loader substituted another one and carried on."""


class ShardChangedError(OSError):
    """A shard no longer holds bytes its index points to (truncated while in use): the run stops."""


@dataclass
class SampleTable:
    """Where every sample of one split lives: per sample the shard id and member offsets (numpy arrays).

    ``cls_*`` locate the ASCII class member; ``lab_*`` the little-endian int32 ``labels`` member of
    multi-label data (size 0 where absent). Labels are read lazily together with the image bytes.
    The shard files are opened on first use in each process, so a table pickles cheaply to workers.
    """

    files: tuple[Path, ...]
    shard: np.ndarray  # int32 (N,)
    jpg_off: np.ndarray  # int64 (N,)
    jpg_size: np.ndarray  # int64 (N,)
    cls_off: np.ndarray
    cls_size: np.ndarray
    lab_off: np.ndarray
    lab_size: np.ndarray
    num_classes: int
    multilabel: bool

    def __post_init__(self) -> None:
        self._fds: dict[int, int] = {}  # shard id -> file descriptor (pread needs no seek: forks share it)
        self.corrupt: set[int] = set()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_shards(cls, shards: str | Path | ShardSet | Sequence[str | Path], split: str = "train",
                    num_classes: int | None = None) -> SampleTable:
        """Build from a shard-set directory / :class:`ShardSet` (uses ``split``) or a list of tar files.

        ``num_classes`` defaults to the manifest's class count; a bare list of tars needs it given.
        """
        multilabel = False
        if isinstance(shards, (str, Path)) and Path(shards).is_dir():
            shards = read_shard_set(shards)
        lengths: tuple[int | None, ...] | None = None
        if isinstance(shards, ShardSet):
            files, lengths = shards.split(split).files, shards.split(split).lengths
            multilabel = shards.multilabel
            num_classes = num_classes or shards.num_classes
        elif isinstance(shards, (str, Path)):
            raise FileNotFoundError(f"{shards}: not a shard-set directory")
        else:
            files = tuple(Path(f) for f in shards)
        if not files:
            raise ValueError(f"no shards for split {split!r}")
        if not num_classes:
            raise ValueError(f"num_classes is unknown for {files[0].parent}: pass num_classes=")
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("shard", "jpg", "cls", "labels")}
        for fid, path in enumerate(files):
            arrays = read_index(path, None if lengths is None else lengths[fid]).members
            n = len(arrays["jpg"])
            cols["shard"].append(np.full(n, fid, np.int32))
            for ext in ("jpg", "cls", "labels"):
                cols[ext].append(arrays[ext])
            multilabel |= bool((arrays["labels"][:, 1] > 0).any())
        cat = {k: np.concatenate(v) for k, v in cols.items()}
        return cls(tuple(files), cat["shard"], cat["jpg"][:, 0], cat["jpg"][:, 1], cat["cls"][:, 0],
                   cat["cls"][:, 1], cat["labels"][:, 0], cat["labels"][:, 1], int(num_classes), multilabel)

    def __len__(self) -> int:
        return len(self.shard)

    # -- reading -----------------------------------------------------------------------------------
    def _read(self, fid: int, offset: int, size: int, what: str) -> bytes:
        """``size`` bytes at ``offset`` of shard ``fid``; ShardChangedError if the file no longer has them."""
        fd = self._fds.get(fid)
        if fd is None:
            fd = self._fds[fid] = os.open(self.files[fid], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ShardChangedError(
                f"{self.files[fid]}: {what} at bytes {offset}-{offset + size} is gone: the file now ends at "
                f"{os.fstat(fd).st_size} bytes (truncated while this loader was reading it); restore or "
                f"re-shard it")
        return data

    def read_sample(self, i: int) -> tuple[np.ndarray, tuple[int, ...]]:
        """``(jpeg, labels)``: the encoded image as a read-only 1-D uint8 array (``bytes(x)``,
        ``cv2.imdecode(x)``, ``io.BytesIO(x)`` all accept it), and its class ids."""
        fid, off, size = int(self.shard[i]), int(self.jpg_off[i]), int(self.jpg_size[i])
        jpg = np.frombuffer(self._read(fid, off, size, f"sample {i}'s jpg"), np.uint8)
        return jpg, self.labels(i)

    def labels(self, i: int) -> tuple[int, ...]:
        fid = int(self.shard[i])
        if self.lab_size[i] > 0:
            off, size = int(self.lab_off[i]), int(self.lab_size[i])
            return tuple(int(c) for c in np.frombuffer(self._read(fid, off, size, f"sample {i}'s labels"), "<i4",
                                                       size // 4))
        off, size = int(self.cls_off[i]), int(self.cls_size[i])
        raw = self._read(fid, off, size, f"sample {i}'s cls")
        try:
            return (int(raw),)
        except ValueError:
            raise ValueError(f"{self.describe(i)}: cls member {raw!r} is not an integer") from None

    def read_batch(self, ids: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, ...]]]:
        pairs = [self.read_sample(int(i)) for i in ids]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def key(self, i: int) -> str:
        """The sample's key, read from the tar header in front of its jpg member (for reports only)."""
        try:
            header = self._read(int(self.shard[i]), int(self.jpg_off[i]) - TAR_BLOCK, 100, "a tar header")
        except OSError:
            return f"#{i}"  # the header is gone too: the sample's place is all a report can give
        return header.split(b"\0", 1)[0].decode("ascii", "replace").split(".", 1)[0]

    def describe(self, i: int) -> str:
        return f"{self.files[int(self.shard[i])]} sample {self.key(i)!r}"

    def mark_corrupt(self, i: int, reason: str) -> None:
        """Record an undecodable sample once, with a warning naming its shard and key."""
        if i in self.corrupt:
            return
        self.corrupt.add(i)
        warnings.warn(f"{self.describe(i)}: cannot decode ({reason}); substituting another sample",
                      CorruptSampleWarning, stacklevel=2)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, drop_last: bool = True) -> int:
    """Steps each rank takes per epoch: train drops the tail, eval pads the last step."""
    per_step = world_size * batch_size
    return num_samples // per_step if drop_last else -(-num_samples // per_step)


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
                drop_last: bool = True, shuffle: bool = True) -> np.ndarray:
    """This rank's sample ids for one epoch, ``steps_per_epoch(...) * batch_size`` of them.

    The global order is a permutation seeded by ``(seed, epoch)`` (identity if not ``shuffle``), dealt
    to ranks by stride. With ``drop_last`` the tail that does not fill a step on every rank is dropped
    (different samples each epoch); without it the order is padded with ``-1`` (masked out by eval).
    Resuming at step ``k`` means starting at ``k * batch_size`` in this array.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    steps = steps_per_epoch(num_samples, world_size, batch_size, drop_last)
    if drop_last and steps == 0:
        raise ValueError(f"{num_samples} samples do not fill one step of {world_size} x {batch_size}")
    order = (np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle
             else np.arange(num_samples))
    total = steps * batch_size * world_size
    if total > num_samples:
        order = np.concatenate([order, np.full(total - num_samples, -1, order.dtype)])
    return order[rank:total:world_size].astype(np.int64)
