"""Where each image is cut: the crop and cutout rules both backends share (host side, numpy only).

A window is ``(x0, y0, w, h)`` in pixels. Each function draws for one image from the Generator it is
given: the OpenCV backend calls them per sample, the DALI backend once per row of a batch before
feeding the windows to its ROI decoder. Importing this module imports neither DALI nor OpenCV.

* Train (``policy="randaugment"``): random-resized crop, area fraction ~ U(area), log-aspect ~
  U(log 3/4, log 4/3), up to 10 draws, the first that fits wins; when none fits, the largest centred
  window whose aspect is inside the range (for ordinary photos: the whole image).
* Fine-tune (``policy="finetune"``, the official fine-tuning augmentation): the whole image, then after the resize to S a cutout
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
Window = tuple[int, int, int, int]  # x0, y0, w, h


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"augment policy must be one of {POLICIES}, got {policy!r}")
    return policy


def random_crop_window(rng: np.random.Generator, height: int, width: int, area: tuple[float, float] = AREA,
                       aspect: tuple[float, float] = ASPECT, attempts: int = ATTEMPTS) -> Window:
    """The random-resized-crop window of one ``height`` x ``width`` image (rule: module docstring).

    Plain Python per image on purpose: the OpenCV backend draws per sample, where a numpy version
    vectorised over a batch costs ten times more for one image (docs/pipeline.md).
    """
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(attempts):
        target = height * width * (area[0] + (area[1] - area[0]) * rng.random())
        ratio = math.exp(lo + (hi - lo) * rng.random())
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.random() * (width - w + 1)), int(rng.random() * (height - h + 1)), w, h
    w = min(width, round(height * aspect[1])) if width > height * aspect[1] else width
    h = min(height, round(width / aspect[0])) if width < height * aspect[0] else height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_crop_ratio(image_size: int, crop_ratio: float | None = None) -> float:
    """The official eval crop: ``S/(S+32)`` of the shorter side below 320 px, the whole image from 320."""
    if crop_ratio is not None:
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        return float(crop_ratio)
    return 1.0 if image_size >= WHOLE_IMAGE_FROM else image_size / (image_size + CROP_PADDING)


def centre_crop_window(height: int, width: int, ratio: float) -> Window:
    """Centre square of side ``int(ratio * min(h, w))`` (official); ``ratio >= 1`` is the whole image."""
    if ratio >= 1.0:
        return 0, 0, width, height
    side = max(int(ratio * min(height, width)), 1)
    return (width - side + 1) // 2, (height - side + 1) // 2, side, side


def noise_cutout(rng: np.random.Generator, size: int) -> tuple[Window, np.ndarray]:
    """The fine-tune cutout of one ``size`` x ``size`` image: its window and its noise, uint8
    ``(h, w, 3)`` uniform over 0..255. Half-size ``size // 4`` around a uniform centre, clipped to
    the image (never empty)."""
    pad = max(size // 4, 1)
    cy, cx = int(rng.integers(size)), int(rng.integers(size))
    y0, x0 = max(cy - pad, 0), max(cx - pad, 0)
    h, w = min(cy + pad, size) - y0, min(cx + pad, size) - x0
    return (x0, y0, w, h), np.frombuffer(rng.bytes(h * w * 3), np.uint8).reshape(h, w, 3)
