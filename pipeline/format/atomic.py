"""Writing a file so that a crash never leaves half of it under its real name: the one way effnetv2
writes shards, indexes, manifests, checkpoints, run records, model config files and result files.

The bytes go to a hidden ``.{name}.partial`` beside the target, are flushed and fsynced, then renamed
over the target (atomic on POSIX), and the folder is fsynced so the rename itself survives a power
loss. On an exception the temporary file is removed and the old target, if any, is untouched. This
module uses only the standard library, so every layer (model, pipeline, recipes, bench) can use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def partial_path(path: str | Path) -> Path:
    """The hidden temporary name a file is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """``with atomic_open(p) as f: f.write(...)``: ``p`` appears complete when the block ends, or not at all."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = partial_path(path)
    f = open(tmp, mode, encoding=encoding if mode == "w" else None)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: library.save(obj, tmp)``: for writers that take a file name
    (safetensors, ONNX, TorchScript); ``p`` appears complete when the block ends, or not at all."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
        commit_partial(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit_partial(tmp: str | Path, path: str | Path) -> None:
    """Fsync an already written temporary file and rename it over ``path`` (for writers that stream
    into the temporary file themselves, such as a tar writer)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """``obj`` as JSON (with a final newline)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
