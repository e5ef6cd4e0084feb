"""The shard format every part of effnetv2 agrees on.

A shard set is a folder holding, per split, uncompressed tar files (plain USTAR headers) named
``{split}-{i:06d}.tar``, one DALI index (format v1.2) per tar named ``{split}-{i:06d}.idx``, and one
manifest ``_info.json`` in timm's layout (``splits.{split}.num_samples/filenames/shard_lengths``)
plus effnetv2's own fields (classes, release, class-list hash, ...).

Each sample is a run of contiguous members sharing an ASCII key without dots:
``{key}.jpg`` (RGB JPEG), ``{key}.cls`` (ASCII class index, the webdataset convention) and, for
multi-label data, ``{key}.labels`` (little-endian int32 class ids; the first one equals ``.cls``).

Writers never leave a half-written file under a real name: a tar and its index are written to
hidden ``.partial`` names, fsynced, and renamed, the index first, the tar last, so that the presence
of a ``.tar`` means the shard is complete.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import atomic
from .index import TAR_BLOCK, index_path, read_index, write_index

MANIFEST = "_info.json"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def check_key(key: str) -> None:
    """Keys must be ASCII without dots: DALI splits a member name at its FIRST dot."""
    if not _KEY_RE.match(key) or key.startswith(("_", "/")) or ".." in key:
        raise ValueError(f"invalid sample key {key!r}: use ASCII letters, digits, '_' and '-' only, no dots")


class ShardWriter:
    """Writes one shard (tar + DALI index) atomically.

    >>> with ShardWriter("out/train-000000.tar") as w:
    ...     w.write("s0001", {"jpg": jpeg_bytes, "cls": b"3"})
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = atomic.partial_path(self.path)
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.TarFile(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._index: list[str] = []
        self._keys: set[str] = set()
        self.num_bytes = 0

    def __len__(self) -> int:
        return len(self._index)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; ``members`` maps extension (no leading dot) to bytes, written in order."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.path}")
        self._keys.add(key)
        parts = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0  # reproducible shards: same input, same bytes
            header_offset = self._tar.offset
            self._tar.addfile(info, io.BytesIO(data))
            parts.append(f"{ext} {header_offset + TAR_BLOCK} {len(data)} {name}")
            self.num_bytes += TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK
        self._index.append(" ".join(parts))

    def close(self) -> Path:
        """Finish the tar, write the index, and move both to their real names."""
        self._tar.close()
        self._file.close()
        write_index(index_path(self.path), self._index)
        atomic.commit_partial(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial files; the real names are never touched."""
        self._tar.fileobj = None  # the tar footer must not be written
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class Split:
    """One split of a shard set: its tar files (absolute paths) and the sample count of each."""

    name: str
    files: tuple[Path, ...]
    lengths: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class ShardSet:
    """A shard set as read from its manifest; what loaders and recipes need to know about data."""

    root: Path
    splits: dict[str, Split]
    classes: tuple[str, ...]
    multilabel: bool = False
    info: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise KeyError(f"{self.root / MANIFEST}: no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


def write_manifest(root: str | Path, info: dict) -> Path:
    """Write ``_info.json`` atomically. ``info`` must hold ``splits`` in timm's layout."""
    return atomic.write_json(Path(root) / MANIFEST, info, sort_keys=True)


def read_shard_set(root: str | Path) -> ShardSet:
    """Load a shard set's manifest and check that every shard it names is present.

    The manifest comes from outside like the shards: anything but the layout :func:`write_manifest`
    writes (wrong types, negative counts, counts that disagree, shard names that leave the folder) is
    one ValueError naming the file and the field.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {root} a shard set made by 'effnetv2 shard'?")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed manifest (not readable JSON: {e})") from e
    try:
        splits, classes, multilabel = _check_manifest(info)
    except ValueError as e:
        raise ValueError(f"{path}: malformed manifest ({e})") from None
    splits = {name: Split(name, tuple(root / f for f in files), lengths) for name, (files, lengths) in splits.items()}
    missing = [str(f) for s in splits.values() for f in s.files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} shard(s) listed but missing, e.g. {missing[0]}")
    return ShardSet(root, splits, classes, multilabel, info)


def _check_manifest(info) -> tuple[dict[str, tuple[tuple[str, ...], tuple[int, ...]]], tuple[str, ...], bool]:
    """The splits (name -> shard names, lengths), classes and multilabel flag of a parsed manifest;
    ValueError saying which field is wrong."""
    if not isinstance(info, dict):
        raise ValueError(f"the top level is a {type(info).__name__}, not an object")
    if not isinstance(info.get("splits"), dict) or not info["splits"]:
        raise ValueError(f"'splits' must be an object of splits, got {_short(info.get('splits'))}")
    splits = {}
    for name, s in info["splits"].items():
        where = f"splits.{name}"
        if not isinstance(s, dict):
            raise ValueError(f"{where} must be an object, got {_short(s)}")
        files, lengths, total = s.get("filenames"), s.get("shard_lengths"), s.get("num_samples")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError(f"{where}.filenames must be a list of file names, got {_short(files)}")
        if not isinstance(lengths, list) or not all(_count(n) for n in lengths):
            raise ValueError(f"{where}.shard_lengths must be a list of non-negative integers, got {_short(lengths)}")
        if not _count(total):
            raise ValueError(f"{where}.num_samples must be a non-negative integer, got {_short(total)}")
        if len(files) != len(lengths) or sum(lengths) != total:
            raise ValueError(f"{where}: {len(files)} filenames, {len(lengths)} shard_lengths summing to "
                             f"{sum(lengths)}, num_samples {total}: they disagree")
        for f in files:
            p = PurePosixPath(f)
            if not f or p.is_absolute() or ".." in p.parts or "\\" in f or not f.endswith(".tar"):
                raise ValueError(f"{where}.filenames: {f!r} is not a .tar file name inside the shard set's folder")
        if len(set(files)) != len(files):
            raise ValueError(f"{where}.filenames: a shard is listed twice")
        splits[str(name)] = (tuple(files), tuple(lengths))
    classes = info.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"'classes' must be a list of names, got {_short(classes)}")
    multilabel = info.get("multilabel", False)
    if not isinstance(multilabel, bool):
        raise ValueError(f"'multilabel' must be true or false, got {_short(multilabel)}")
    return splits, tuple(classes), multilabel


def _count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def iter_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` from one shard in order, using its index (no tar parsing)."""
    entries = read_index(tar_path).samples()
    with open(tar_path, "rb") as f:
        for entry in entries:
            sample = {}
            key = None
            for ext, (offset, size) in entry.items():
                f.seek(offset - TAR_BLOCK)
                header = tarfile.TarInfo.frombuf(f.read(TAR_BLOCK), "ascii", "strict")
                key = header.name[: header.name.find(".")]
                sample[ext] = f.read(size)
            yield key, sample
