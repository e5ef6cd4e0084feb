"""Fashion-MNIST (Debian package ``dataset-fashion-mnist``) as a source for the sharder.

70,000 real product photos, 28x28 grayscale, 10 classes. The demo upscales them so that progressive
learning has room to grow the image size; the sharder turns them into RGB JPEG.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
_FILES = {"train": "train", "test": "t10k"}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (the MNIST container: big-endian magic, dimension sizes, uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    got = struct.unpack(">I", data[:4])[0]
    if got != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {got:#x}, expected {magic:#x})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated ({body.size} bytes of data for shape {shape})")
    return body.reshape(shape)


def load(split: str, root: Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of ``split`` ("train" or "test")."""
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(_FILES)}")
    stem = _FILES[split]
    images_path = root / f"{stem}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise FileNotFoundError(
            f"{images_path} not found: install Fashion-MNIST with 'sudo apt-get install dataset-fashion-mnist'"
        )
    images = _read_idx(images_path, 0x803)
    labels = _read_idx(root / f"{stem}-labels-idx1-ubyte.gz", 0x801)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return images, labels


def encoded(images: np.ndarray, size: int) -> Iterator[bytes]:
    """Each image resized (bicubic) to ``size`` x ``size`` and encoded losslessly as grayscale PNG.

    At the native 28 px the pixels are kept as they are (no resampling).
    """
    for img in images:
        buf = io.BytesIO()
        pil = Image.fromarray(img)
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.BICUBIC)
        pil.save(buf, format="PNG", compress_level=1)
        yield buf.getvalue()
