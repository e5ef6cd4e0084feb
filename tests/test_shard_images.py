"""Every kind of input image lands where it should: copied, converted to RGB JPEG, or rejected."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import random_crops
from PIL import Image

from effnetv2.pipeline.format.jpeg import Frame, read_frame
from effnetv2.pipeline.sharder.images import check_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def malformed_inputs(rgb: np.ndarray) -> dict[str, tuple[bytes, str, str]]:
    """name -> (file bytes, expected action, expected reason prefix) for one real photo crop."""
    img = Image.fromarray(rgb)
    gray16 = (np.asarray(img.convert("L")).astype(np.uint16) * 257)
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.arange(img.width) < img.width // 2, 0, 255)
                                  .astype(np.uint8)[None].repeat(img.height, 0)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    good = encode(img, "JPEG", quality=90)
    return {
        "baseline.jpg": (good, "copied", ""),
        "progressive.jpg": (encode(img, "JPEG", quality=90, progressive=True), "copied", ""),
        "cmyk.jpg": (encode(img.convert("CMYK"), "JPEG", quality=95), "converted", "JPEG/CMYK"),
        "gray.jpg": (encode(img.convert("L"), "JPEG", quality=95), "converted", "JPEG/L"),
        "rotated.jpg": (encode(img, "JPEG", quality=95, exif=exif), "converted", "JPEG/RGB EXIF-rotated"),
        "palette.png": (encode(img.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "converted", "PNG/P"),
        "deep.png": (encode(Image.fromarray(gray16), "PNG"), "converted", "PNG/I;16"),
        "alpha.png": (encode(rgba, "PNG"), "converted", "PNG/RGBA"),
        "png_named.JPEG": (encode(img, "PNG"), "converted", "PNG/RGB"),
        "anim.gif": (encode(img, "GIF"), "converted", "GIF/P"),
        "photo.webp": (encode(img, "WEBP", quality=95), "converted", "WEBP/RGB"),
        "photo.bmp": (encode(img, "BMP"), "converted", "BMP/RGB"),
        "truncated.jpg": (good[: len(good) * 2 // 3], "rejected", "truncated"),
        "no_eoi.jpg": (good[:-2], "rejected", "truncated"),
        "empty.jpg": (b"", "rejected", "empty file"),
        "random.jpg": (np.random.default_rng(0).bytes(5000), "rejected", "not an image format"),
    }


@pytest.fixture(scope="module")
def crop(photos) -> np.ndarray:
    return random_crops(photos, 1, seed=3, size=(120, 140))[0]


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.mode == "RGB", (img.format, img.mode)
    return img


@pytest.mark.parametrize("name", list(malformed_inputs(np.zeros((8, 8, 3), np.uint8))))
def test_each_kind_lands_where_it_should(crop, name):
    data, action, reason = malformed_inputs(crop)[name]
    got = check_image(data, quality=95)
    assert got.action == action, (name, got.reason)
    assert got.reason.startswith(reason), (name, got.reason)
    if action == "rejected":
        assert got.data is None
        return
    if action == "copied":
        assert got.data == data  # byte-for-byte: no generation loss
        return
    out = np.asarray(decode(got.data), dtype=np.float32)
    assert (got.width, got.height) == (out.shape[1], out.shape[0])
    src = crop.astype(np.float32)
    if name == "rotated.jpg":
        src = np.rot90(src, k=-1)  # EXIF 6 = display rotated 90 degrees clockwise
    if name in ("gray.jpg", "deep.png"):
        src = np.asarray(Image.fromarray(crop).convert("L"), np.float32)[..., None].repeat(3, -1)
    if name == "alpha.png":
        src[:, : crop.shape[1] // 2] = 255  # transparent left half composited over white
    assert out.shape == src.shape
    tolerance = 20 if name in ("palette.png", "anim.gif") else 6  # 256-colour quantisation
    assert np.abs(out - src).mean() < tolerance, name


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    got = check_image(encode(Image.fromarray(ramp), "PNG"), quality=100)
    out = np.asarray(decode(got.data))[..., 0].astype(np.float32)
    assert abs(out.mean() - 127.5) < 3 and out.max() > 245  # clipping would saturate almost everything


def test_max_side_downscales_keeping_aspect(crop):
    big = np.asarray(Image.fromarray(crop).resize((300, 200)))
    data = encode(Image.fromarray(big), "JPEG", quality=95)
    got = check_image(data, max_side=90)
    assert got.action == "converted" and "max-side" in got.reason
    assert decode(got.data).size == (90, 60) == (got.width, got.height)
    same = check_image(data, max_side=300)
    assert same.action == "copied" and same.data == data


def test_read_frame_reads_the_sof_marker(crop):
    img = Image.fromarray(crop)
    h, w = crop.shape[:2]
    assert read_frame(encode(img, "JPEG")) == Frame(0xC0, 8, h, w, 3)
    assert read_frame(encode(img, "JPEG", progressive=True)) == Frame(0xC2, 8, h, w, 3)
    assert read_frame(encode(img.convert("L"), "JPEG")) == Frame(0xC0, 8, h, w, 1)
    assert read_frame(encode(img, "PNG")) is None
