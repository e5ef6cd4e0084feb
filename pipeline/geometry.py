"""Where each image is cut: the crop and cutout rules both backends share (host side, numpy only).

A window is a row ``(x0, y0, w, h)`` in source pixels (int32), one per image. The DALI backend
computes a batch of windows per step and feeds them to its ROI decoder; the OpenCV backend calls the
same functions with one row per sample. Importing this module imports neither DALI nor OpenCV.

* Train (``policy="randaugment"``): random-resized crop, area fraction ~ U(area), log-aspect ~
  U(log 3/4, log 4/3), up to 10 draws, the first that fits wins; when none fits, the largest centred
  window whose aspect is inside the range (for ordinary photos: the whole image).
* Fine-tune (``policy="finetune"``, facts §4): the whole image, then after the resize to S a cutout
  of half-size S/4 at a uniform centre (clipped to the image) filled with uniform noise.
* Eval: a centred square of side ``int(r · min(H, W))`` with ``r = S/(S+32)`` below 320 px and the
  whole image from 320 px (official), or a chosen ratio.
"""

from __future__ import annotations

import math

import numpy as np

AREA = (0.05, 1.0)
ASPECT = (3 / 4, 4 / 3)
ATTEMPTS = 10
CROP_PADDING = 32  # official eval crop: S / (S + 32) below WHOLE_IMAGE_FROM px
WHOLE_IMAGE_FROM = 320
POLICIES = ("randaugment", "finetune")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"augment policy must be one of {POLICIES}, got {policy!r}")
    return policy


def random_crop_windows(rng: np.random.Generator, hw: np.ndarray, area: tuple[float, float] = AREA,
                        aspect: tuple[float, float] = ASPECT, attempts: int = ATTEMPTS) -> np.ndarray:
    """Random-resized-crop windows for images of sizes ``hw`` ((n, 2): height, width); see the module
    docstring for the rule. Vectorised over the batch: all draws first, then the first fit per row."""
    hw = np.asarray(hw, np.int64).reshape(-1, 2)
    n = len(hw)
    h, w = hw[:, :1].astype(np.float64), hw[:, 1:].astype(np.float64)
    target = h * w * rng.uniform(*area, (n, attempts))
    ratio = np.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]), (n, attempts)))
    cw, ch = np.round(np.sqrt(target * ratio)), np.round(np.sqrt(target / ratio))
    fits = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)
    first = np.argmax(fits, axis=1)
    rows = np.arange(n)
    ok = fits[rows, first]
    fw, fh = _clamped_aspect(hw[:, 0], hw[:, 1], aspect)
    cw = np.where(ok, cw[rows, first], fw)
    ch = np.where(ok, ch[rows, first], fh)
    u = rng.random((n, 2))
    x0 = np.where(ok, np.floor(u[:, 0] * (w[:, 0] - cw + 1)), (w[:, 0] - cw) // 2)
    y0 = np.where(ok, np.floor(u[:, 1] * (h[:, 0] - ch + 1)), (h[:, 0] - ch) // 2)
    return np.stack([x0, y0, cw, ch], 1).astype(np.int32)


def _clamped_aspect(h: np.ndarray, w: np.ndarray, aspect: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The largest (width, height) inside each image whose aspect w/h lies in ``aspect``."""
    r = w / h
    cw = np.where(r > aspect[1], np.minimum(w, np.round(h * aspect[1])), w)
    ch = np.where(r < aspect[0], np.minimum(h, np.round(w / aspect[0])), h)
    return cw.astype(np.float64), ch.astype(np.float64)


def eval_crop_ratio(image_size: int, crop_ratio: float | None = None) -> float:
    """The official eval crop: ``S/(S+32)`` of the shorter side below 320 px, the whole image from 320."""
    if crop_ratio is not None:
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        return float(crop_ratio)
    return 1.0 if image_size >= WHOLE_IMAGE_FROM else image_size / (image_size + CROP_PADDING)


def centre_crop_windows(hw: np.ndarray, ratio: float) -> np.ndarray:
    """Centre square of side ``int(ratio * min(h, w))`` (official); ``ratio >= 1`` is the whole image."""
    hw = np.asarray(hw, np.int64).reshape(-1, 2)
    h, w = hw[:, 0], hw[:, 1]
    if ratio >= 1.0:
        return np.stack([np.zeros_like(w), np.zeros_like(h), w, h], 1).astype(np.int32)
    side = np.maximum((ratio * np.minimum(h, w)).astype(np.int64), 1)
    return np.stack([(w - side + 1) // 2, (h - side + 1) // 2, side, side], 1).astype(np.int32)


def noise_cutouts(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The fine-tune cutout for ``n`` images of ``size`` x ``size``: anchors (n, 2) and shapes (n, 2)
    as (y, x) / (h, w) int32, and each box's noise, uint8 (h, w, 3) uniform over 0..255.

    Half-size ``size // 4`` around a uniform centre, clipped to the image (never empty).
    """
    pad = max(size // 4, 1)
    centre = rng.integers(0, size, (n, 2))
    lo, hi = np.clip(centre - pad, 0, size), np.clip(centre + pad, 0, size)
    shape = hi - lo
    noise = [np.frombuffer(rng.bytes(int(h * w * 3)), np.uint8).reshape(h, w, 3) for h, w in shape]
    return lo.astype(np.int32), shape.astype(np.int32), noise
