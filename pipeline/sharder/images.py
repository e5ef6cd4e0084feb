"""Check one encoded image and turn it into what a shard stores: an RGB JPEG.

Every image is looked at once, when it is sharded, so that loaders never meet a surprise:

- RGB JPEGs that every decoder reads the same way (Huffman-coded baseline, extended or progressive,
  8 bits, 3 components, no EXIF rotation) are **copied byte-for-byte**: no generation loss.
- Everything else PIL can decode is **converted** to an RGB JPEG at ``quality``: CMYK/YCCK and
  grayscale JPEGs, arithmetic-coded JPEGs (nvJPEG cannot read them), EXIF-rotated JPEGs (decoders
  disagree on whether to apply the tag, so the rotation is applied once here), PNG/GIF/WebP/BMP/TIFF
  (also when a file is named ``.JPEG``), palette, alpha (composited over white), 16-bit images
  (scaled, not clipped). The format is read from the bytes, never from the file name.
- Empty, truncated and undecodable files are **rejected** with a reason.

A copied JPEG is checked by decoding its whole entropy-coded stream at 1/8 scale (PIL's ``draft``
mode): it catches files cut inside a scan at half the cost of a full decode (why this and not a header
check: docs/pipeline.md, "The sharder's image check").
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from effnetv2.pipeline.format.jpeg import MAX_PIXELS, read_frame

# SOF markers of Huffman-coded, non-differential DCT JPEGs: baseline, extended sequential, progressive.
_COPYABLE_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclass(frozen=True, slots=True)
class CheckedImage:
    """The outcome for one input: what to store (``data``, None when rejected) and why."""

    data: bytes | None
    action: str  # "copied" | "converted" | "rejected"
    reason: str  # "" when copied; e.g. "PNG/P", "JPEG/CMYK", "truncated: ..." otherwise
    width: int = 0
    height: int = 0


def _copy_blocker(img: Image.Image, data: bytes) -> str:
    """Why a JPEG that PIL reads as RGB must still be re-encoded; "" if it can be copied."""
    frame = read_frame(data)
    if frame is None:
        return "JPEG/RGB without a frame header"
    marker, bits, components = frame.marker, frame.precision, frame.components
    if marker not in _COPYABLE_SOF or bits != 8 or components != 3:
        return f"JPEG/RGB SOF{marker - 0xC0} {bits}-bit (not Huffman baseline/progressive)"
    if "exif" in img.info and img.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):
        return "JPEG/RGB EXIF-rotated"
    return ""


def _target_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """The downscaled size keeping aspect, or None when the image already fits."""
    if not max_side or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit scaled to 8 bits, alpha composited over white."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr * (255.0 / 65535.0)
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def check_image(data: bytes, *, quality: int = 95, max_side: int | None = None) -> CheckedImage:
    """Copy, convert or reject one encoded image (see the module docstring for the rules).

    ``max_side`` downscales images whose longer side exceeds it (keeping aspect); such images are
    re-encoded even when they could otherwise be copied.
    """
    if not data:
        return CheckedImage(None, "rejected", "empty file")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = "JPEG" if img.format in ("JPEG", "MPO") else (img.format or "unknown")
        kind = f"{fmt}/{img.mode}"
        width, height = img.size
        if width * height > MAX_PIXELS:  # the loaders' limit too; PIL's own can be changed by the caller
            return CheckedImage(None, "rejected", f"too large: {width} x {height} pixels (at most {MAX_PIXELS:,})")
        target = _target_size(width, height, max_side)
        if fmt == "JPEG" and img.mode == "RGB" and target is None:
            blocker = _copy_blocker(img, data)
            if not blocker:
                img.draft("RGB", (1, 1))  # decode every coded block at 1/8 scale: catches truncation
                img.load()
                return CheckedImage(data, "copied", "", width, height)
            kind = blocker
        elif target is not None:
            kind = f"{kind} larger than max-side {max_side}"
            if fmt == "JPEG":
                img.draft(None, (2 * target[0], 2 * target[1]))  # cheap DCT-domain pre-scale
        img.load()
        img = _to_rgb(ImageOps.exif_transpose(img))
        target = _target_size(img.width, img.height, max_side)  # again: draft and EXIF change the size
        if target is not None:
            img = img.resize(target, Image.Resampling.LANCZOS)
    except UnidentifiedImageError:
        return CheckedImage(None, "rejected", "not an image format PIL can read")
    except Image.DecompressionBombError as e:
        return CheckedImage(None, "rejected", f"too large: {e}")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if "truncated" in str(e) else "undecodable"
        return CheckedImage(None, "rejected", f"{reason}: {e}")
    if min(img.size) < 1:
        return CheckedImage(None, "rejected", "image has no pixels")
    return CheckedImage(_encode(img, quality), "converted", kind, img.width, img.height)
