"""Reading a JPEG's frame header without decoding it: one parser for the sharder and both loaders.

The sharder asks which coding process a file uses (copy it byte-for-byte or convert it); the loaders
ask for the image size (to draw the crop window before decoding) and whether the stream is complete.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

#: start-of-frame markers (SOF0-SOF15 without DHT 0xC4, JPG 0xC8 and DAC 0xCC)
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: The most pixels an image may have, for the sharder and both loaders alike (PIL's decompression-bomb
#: limit, 2 x its MAX_IMAGE_PIXELS). A header claiming more is a corrupt or hostile sample: decoding it
#: would cost gigabytes (OpenCV decodes a 65500 x 65500 header into a grey 8188 x 8188 picture).
MAX_PIXELS = 178_956_970


@dataclass(frozen=True, slots=True)
class Frame:
    """The frame header: coding process (SOF marker), sample precision, size and component count."""

    marker: int
    precision: int
    height: int
    width: int
    components: int


def read_frame(data: bytes | memoryview | np.ndarray) -> Frame | None:
    """The frame header of a JPEG, walking its markers; None if the data has none before the first scan."""
    buf = data.data if isinstance(data, np.ndarray) else memoryview(data).cast("B")
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker in SOF_MARKERS:
            if pos + 10 > n:
                return None
            return Frame(marker, buf[pos + 4], (buf[pos + 5] << 8) | buf[pos + 6],
                         (buf[pos + 7] << 8) | buf[pos + 8], buf[pos + 9])
        elif marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        else:
            pos += 2 + ((buf[pos + 2] << 8) | buf[pos + 3])
    return None


def jpeg_size(data: bytes | memoryview | np.ndarray) -> tuple[int, int] | None:
    """``(height, width)`` from the frame header, or None when there is no usable one."""
    frame = read_frame(data)
    if frame is None or frame.height == 0 or frame.width == 0:
        return None
    return frame.height, frame.width


def check_pixels(height: int, width: int) -> None:
    """ValueError when an image of ``height`` x ``width`` has more than :data:`MAX_PIXELS` pixels."""
    if height * width > MAX_PIXELS:
        raise ValueError(f"its header claims {width} x {height} pixels, more than the {MAX_PIXELS:,} an image "
                         f"may have")


def checked_jpeg_size(data: bytes | memoryview | np.ndarray) -> tuple[int, int]:
    """``(height, width)``; ValueError when the data is not a complete JPEG or has more than
    :data:`MAX_PIXELS` pixels.

    A missing end-of-image marker (a truncated file) is confirmed with a full PIL decode before the
    sample is rejected, so files with harmless trailing bytes still pass.
    """
    buf = data.data if isinstance(data, np.ndarray) else memoryview(data).cast("B")
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        raise ValueError("no JPEG start-of-image marker")
    size = jpeg_size(buf)
    if size is None:
        raise ValueError("no frame header with a valid size")
    check_pixels(*size)
    if bytes(buf[-2:]) != b"\xff\xd9":
        from PIL import Image

        try:
            Image.open(io.BytesIO(buf)).load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken streams
            raise ValueError(f"truncated or broken JPEG data ({e})") from None
    return size
