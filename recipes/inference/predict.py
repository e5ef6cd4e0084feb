"""Predict the classes of image files, prepared exactly as the eval loader prepares a shard's samples.

- Decoding: PIL reads JPEG, PNG, WebP, GIF, BMP, TIFF; the EXIF rotation is applied and every mode (CMYK,
  grayscale, palette, alpha, 16-bit) becomes 8-bit RGB by the sharder's own rules
  (:func:`effnetv2.pipeline.sharder.images._to_rgb`), so a file looks as it would after sharding.
- Geometry: the official centre crop (:func:`~effnetv2.pipeline.loaders.geometry.eval_crop_ratio`,
  :func:`~effnetv2.pipeline.loaders.geometry.centre_crop_window`), a JPEG decoded at the reduced libjpeg scale
  the OpenCV backend picks for that crop, and its bilinear ``crop_resize``: the functions the eval loader
  runs. (An eval through the DALI backend decodes with nvJPEG and resizes with DALI's filter: close to
  this, not bit-identical.)
- Pixels: ``(u8 - 128) / 128`` as the loader computes it (``u8 * 2^-7 - 1``, exact in fp32).

A file that cannot be read is returned as a :class:`Failure` (path and reason), never raised, so one bad
file in a folder does not stop the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from effnetv2.pipeline.loaders.geometry import centre_crop_window, eval_crop_ratio
from effnetv2.pipeline.loaders.opencv.backend import crop_resize, reduction
from effnetv2.pipeline.sharder.images import _to_rgb

from ..engine.evaluate import tta_logits

# what a folder is searched for (a file named on the command line is read whatever its name)
_EXIF_ORIENTATION = 0x0112
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Prediction:
    path: Path
    indices: tuple[int, ...]  # the top k classes, best first
    scores: tuple[float, ...]  # their probabilities (softmax; sigmoid for a BCE-trained model)


@dataclass(frozen=True)
class Failure:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def list_images(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Failure]]:
    """Files to predict: each file as given, and the image files under each folder (recursively, sorted);
    a path that does not exist is a failure."""
    files, missing = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.exists():
            files.append(item)
        else:
            missing.append(Failure(item, "no such file or folder"))
    return files, missing


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file, EXIF rotation applied; ValueError with the reason."""
    return _decode(path, None, None)[0]


def load_image(path: str | os.PathLike, image_size: int, crop_ratio: float | None = None) -> np.ndarray:
    """One image file as the eval loader makes a sample of it: uint8 (S, S, 3), RGB. A JPEG is decoded at
    the libjpeg scale (1/2, 1/4, 1/8) that the OpenCV backend's reduced decode picks for the crop
    (``reduction``; PIL's ``draft`` is the same DCT scaling), then the centre crop (official ratio unless
    given) is resized bilinearly to S x S (``crop_resize``). ValueError with the reason."""
    img, window, full_hw = _decode(path, image_size, eval_crop_ratio(image_size, crop_ratio))
    return crop_resize(img, window, full_hw, image_size)


def _decode(path, image_size: int | None, ratio: float | None):
    """(RGB uint8 image, the crop window and the full upright size (H, W) it is drawn in)."""
    try:
        with Image.open(path) as img:
            turned = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # transposed: H and W swap
            h, w = (img.width, img.height) if turned else (img.height, img.width)
            window = centre_crop_window(h, w, ratio) if ratio is not None else (0, 0, w, h)
            if image_size is not None and img.format in ("JPEG", "MPO"):
                r = reduction(window, image_size)
                if r > 1:  # draft picks the largest scale 1/s with s <= min(W // w, H // h)
                    img.draft(None, (img.width // r, img.height // r))
            img.load()
            rgb = _to_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError:
        raise ValueError("not an image format PIL can read") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"cannot decode ({e})") from None
    if min(rgb.size) < 1:
        raise ValueError("image has no pixels")
    return np.ascontiguousarray(np.asarray(rgb)), window, (h, w)


def to_input(batch: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) channels_last, ``(u8 - 128) / 128`` as the loader makes it."""
    u8 = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
    x = torch.empty_like(u8, dtype=torch.float32, memory_format=torch.channels_last)
    return torch.mul(u8, 1.0 / 128, out=x).sub_(1.0)


@torch.no_grad()
def predict_files(model: nn.Module, paths: Sequence[Path], *, image_size: int, crop_ratio: float | None = None,
                  top_k: int = 5, batch_size: int = 32, scores: str = "softmax", tta: str | None = None,
                  amp_dtype: torch.dtype | None = None) -> Iterator[Prediction | Failure]:
    """One :class:`Prediction` or :class:`Failure` per path, in order; ``model`` in eval mode on its device."""
    device = next(model.parameters()).device
    k = min(top_k, model.num_classes)
    model.eval()
    for start in range(0, len(paths), batch_size):
        done: dict[int, Prediction | Failure] = {}
        ready: list[tuple[int, np.ndarray]] = []
        for i, path in enumerate(paths[start:start + batch_size]):
            try:
                ready.append((i, load_image(path, image_size, crop_ratio)))
            except ValueError as e:
                done[i] = Failure(path, str(e))
        if ready:
            x = to_input(np.stack([img for _, img in ready]), device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = tta_logits(model, x, tta)
            probs = logits.softmax(1) if scores == "softmax" else logits.sigmoid()
            top = probs.topk(k, dim=1)
            for (i, _), idx, val in zip(ready, top.indices.tolist(), top.values.tolist()):
                done[i] = Prediction(paths[start + i], tuple(idx), tuple(val))
        yield from (done[i] for i in sorted(done))
