"""The "albumentations" backend: torch DataLoader workers that decode and augment whole batches with OpenCV.

It runs wherever DALI does not (macOS, Windows, CPU-only machines) and is the CPU peer DALI must beat.
``loader.py`` wraps it; this module turns sample ids into uint8 NHWC batches, nothing more (no
normalisation, targets or mixup: those happen on the device, the same for both backends).

Design, and why:

* **One DataLoader item = one whole batch.** A map-style dataset whose "index" is ``(epoch, ids)``:
  the worker reads the JPEGs from the shards' memory maps (:class:`SampleTable`), decodes, augments and
  writes each sample into one preallocated ``(B, S, S, 3)`` uint8 tensor (in shared memory when in a
  worker, so handing it to the main process copies nothing). No per-sample collation, no per-sample
  IPC. Workers are persistent: each ``batches()`` call only changes what the sampler hands out.
* **Randomness per sample** from ``np.random.default_rng([seed, epoch, sample_id])``: the same sample
  in the same epoch gets the same crop, flip and RandAugment whatever the worker count, batch size,
  rank layout or resume point, and two ranks never share a random stream.
* **Decode at reduced size when the crop allows** (``cv2.IMREAD_REDUCED_*``: libjpeg scales in the DCT
  domain, 1/2, 1/4 or 1/8): the crop box is drawn first from the size in the JPEG header, then the
  largest reduction ``r`` with ``min(crop_h, crop_w) / r >= S`` is used, so the final bilinear resize
  is still a downscale (never an upscale of a reduced image). The crop region is the same; the only
  difference is that the reduced pixels are block averages (less aliasing than bilinear decimation),
  and the box edges are rounded to the reduced grid (at most r/2 source pixels). Saves ~20-30% of the
  decode where it applies (crops ≥ 2S px, e.g. half the crops of 360 px images at 128 px).
  ``reduced_decode=False`` turns it off (full decode, crop, resize).
* **Crop before resize**, ``cv2.resize`` INTER_LINEAR on the crop view (4x faster than one
  ``warpAffine`` doing crop+resize), then flip, then RandAugment at the target size on uint8
  (:mod:`.randaugment_np`, official semantics).
* **Why little of albumentations itself:** its transforms do not match the official ops (e.g.
  ``Equalize`` is ``cv2.equalizeHist``, ``Solarize``/``Posterize`` take other level scales, there is no
  SolarizeAdd with the official threshold, its ``RandomResizedCrop`` cannot share the crop box with a
  reduced-size decode) and every transform call costs parameter dictionaries and checks. The op suite
  is therefore plain OpenCV/numpy; "albumentations" is the user-facing name of this CPU backend.

Train: the crop window from :mod:`.geometry` (random-resized crop; for ``policy="finetune"`` the whole
image), bilinear resize to S, horizontal flip with p=0.5, then RandAugment (``randaug_magnitude=None``
= off; 0 is level 0) or, for fine-tuning, the noise cutout of :func:`.geometry.noise_cutout`.
Eval: the centre window of :func:`.geometry.centre_crop_window` with ``r = eval_crop_ratio(S,
crop_ratio)`` (None: S/(S+32) below 320 px), resized to S×S.

Corrupt samples (the loader contract): a row whose JPEG cannot be decoded gets labels ``()`` and a
zero image; the main process reports it once with shard and key (:meth:`SampleTable.mark_corrupt`)
and the loader substitutes (train) or masks (eval) the row.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from effnetv2.pipeline.format.jpeg import jpeg_size

from ..geometry import AREA, Window, centre_crop_window, eval_crop_ratio, noise_cutout, random_crop_window
from ..sampler import SampleTable
from .randaugment import RandAugment

# RGB output, stored pixel order: an EXIF orientation tag is ignored (the sharder applies rotations once,
# DALI ignores the tag too, and the crop box is drawn in the frame header's coordinates).
_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
_DECODE_FLAGS = {1: _RGB, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2 | _RGB, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4 | _RGB,
                 8: cv2.IMREAD_REDUCED_GRAYSCALE_8 | _RGB}


# -- decode and resize ------------------------------------------------------------------------------
def reduction(window: Window, size: int) -> int:
    """The largest libjpeg scale-down (8, 4, 2) that keeps the crop at least ``size`` px on both sides."""
    short = min(window[2], window[3])
    for r in (8, 4, 2):
        if short >= r * size:
            return r
    return 1


def decode(data: np.ndarray, reduce: int = 1) -> np.ndarray | None:
    """RGB uint8 (H, W, 3) decoded at 1/``reduce`` size, or None when OpenCV cannot decode it."""
    if len(data) == 0:
        return None
    try:
        img = cv2.imdecode(data, _DECODE_FLAGS[reduce])
    except cv2.error:
        return None
    return img if img is not None and img.ndim == 3 and img.size else None


def crop_resize(img: np.ndarray, window: Window, src_hw: tuple[int, int], size: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """Cut ``window`` (in ``src_hw`` source pixels; ``img`` may be a reduced decode) and resize to size²."""
    sy, sx = img.shape[0] / src_hw[0], img.shape[1] / src_hw[1]
    x, y, w, h = window
    y0, x0 = round(y * sy), round(x * sx)
    y1 = min(img.shape[0], max(y0 + 1, round((y + h) * sy)))
    x1 = min(img.shape[1], max(x0 + 1, round((x + w) * sx)))
    return cv2.resize(img[y0:y1, x0:x1], (size, size), dst=out, interpolation=cv2.INTER_LINEAR)


# -- the per-batch work ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentSpec:
    """Everything a worker needs to turn one sample into S×S uint8 pixels."""

    image_size: int
    train: bool
    randaug_magnitude: float | None = None  # None: no RandAugment
    randaug_layers: int = 2
    seed: int = 0
    crop_ratio: float = 1.0  # resolved (eval_crop_ratio); >= 1: whole image
    reduced_decode: bool = True
    crop_area: tuple[float, float] = AREA  # random-resized-crop area fraction (train)
    policy: str = "randaugment"  # train augmentation: "randaugment" or "finetune" (geometry.POLICIES)

    @property
    def finetune(self) -> bool:
        return self.train and self.policy == "finetune"


class _BatchDataset(Dataset):
    """Map-style dataset whose index is ``(epoch, ids)`` and whose item is one finished batch."""

    def __init__(self, table: SampleTable, spec: AugmentSpec):
        self.table = table
        self.spec = spec
        on = spec.train and not spec.finetune and spec.randaug_magnitude is not None and spec.randaug_layers > 0
        self.randaug = RandAugment(spec.randaug_magnitude, spec.randaug_layers) if on else None

    def __getitem__(self, item: tuple[int, np.ndarray]) -> tuple[torch.Tensor, list, list]:
        """``(images (B, S, S, 3) uint8, labels per row, [(sample id, why undecodable), ...])``."""
        epoch, ids = item
        size = self.spec.image_size
        images = _new_uint8((len(ids), size, size, 3))
        out = images.numpy()
        labels: list[tuple[int, ...]] = []
        corrupt: list[tuple[int, str]] = []
        for k, sid in enumerate(ids.tolist()):
            reason = "padding"
            if sid >= 0:
                data, labs = self.table.read_sample(sid)
                rng = np.random.default_rng([self.spec.seed, epoch, sid]) if self.spec.train else None
                reason = self._sample(data, rng, out[k])
            if reason:
                out[k] = 0
                labs = ()
                if sid >= 0:
                    corrupt.append((sid, reason))
            labels.append(labs)
        return images, labels, corrupt

    def _sample(self, data: np.ndarray, rng: np.random.Generator | None, out: np.ndarray) -> str:
        """Decode and augment one JPEG into ``out``; returns "" or why it could not be decoded."""
        spec, size = self.spec, self.spec.image_size
        src_hw = jpeg_size(data)
        img = None
        if src_hw is None:  # no readable header: decode fully, then the box comes from the pixels
            img = decode(data)
            if img is None:
                return "not a decodable JPEG"
            src_hw = img.shape[:2]
        if spec.train and not spec.finetune:
            window = random_crop_window(rng, *src_hw, spec.crop_area)
        else:
            window = centre_crop_window(*src_hw, 1.0 if spec.train else spec.crop_ratio)
        if img is None:
            img = decode(data, reduction(window, size) if spec.reduced_decode else 1)
            if img is None:
                return "cv2.imdecode failed"
        if not spec.train:
            crop_resize(img, window, src_hw, size, out=out)
            return ""
        img = crop_resize(img, window, src_hw, size)
        if rng.random() < 0.5:
            img = cv2.flip(img, 1)
        if spec.finetune:
            (x, y, w, h), noise = noise_cutout(rng, size)
            img[y : y + h, x : x + w] = noise
        elif self.randaug is not None:
            img = self.randaug(img, rng)
        out[...] = img
        return ""


def _new_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor; in a worker, born in shared memory so passing it to the main process is free."""
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    return torch.empty(shape, dtype=torch.uint8)


def _init_worker(_: int) -> None:
    cv2.setNumThreads(0)  # one worker = one core; OpenCV's own threads would only contend


def _as_is(batch):
    return batch


class _BatchPlan(Sampler):
    """Hands out ``(epoch, ids)`` per batch; re-pointed by every ``batches()`` call (persistent workers)."""

    def __init__(self) -> None:
        self.epoch, self.order, self.batch_size, self.start = 0, np.zeros(0, np.int64), 1, 0

    def __len__(self) -> int:
        return len(self.order) // self.batch_size - self.start

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        b = self.batch_size
        for step in range(self.start, len(self.order) // b):
            yield self.epoch, self.order[step * b : (step + 1) * b]


# -- the backend -----------------------------------------------------------------------------------
def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus)


class AlbuBackend:
    """Batches of uint8 (B, S, S, 3) RGB images and the label tuple of every row (the loader contract).

    ``batches(order, batch_size, epoch, start_step)`` yields steps ``start_step ..
    len(order) // batch_size - 1`` of ``order`` (this rank's sample ids, e.g. from
    :func:`.sampler.epoch_order`; ids < 0 give zero images with labels ``()``). One iteration at a
    time: a new ``batches()`` call abandons the previous one. ``pin_memory=True`` when the batches go
    to a CUDA device (pinned in the DataLoader's thread, off the training loop).
    """

    def __init__(self, table: SampleTable, image_size: int, randaug_magnitude: float | None = None,
                 randaug_layers: int = 2, num_workers: int | None = None, seed: int = 0, train: bool = True,
                 crop_ratio: float | None = None, *, pin_memory: bool = False, reduced_decode: bool = True,
                 prefetch_factor: int = 2, crop_area: tuple[float, float] = AREA, policy: str = "randaugment"):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        magnitude = None if randaug_magnitude is None else float(randaug_magnitude)
        self.table = table
        self.spec = AugmentSpec(int(image_size), bool(train), magnitude, int(randaug_layers), int(seed),
                                eval_crop_ratio(int(image_size), crop_ratio), reduced_decode,
                                tuple(crop_area), policy)
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self._plan = _BatchPlan()
        workers = self.num_workers > 0
        self._loader: DataLoader | None = DataLoader(
            _BatchDataset(table, self.spec), batch_size=None, sampler=self._plan, num_workers=self.num_workers,
            collate_fn=_as_is, pin_memory=pin_memory, worker_init_fn=_init_worker if workers else None,
            persistent_workers=workers, prefetch_factor=prefetch_factor if workers else None,
            generator=torch.Generator())  # its seed draws must not advance the trainer's global torch RNG

    @property
    def num_corrupt(self) -> int:
        """Undecodable samples met so far (each reported once, with its shard and key)."""
        return len(self.table.corrupt)

    def batches(self, order: np.ndarray, batch_size: int, epoch: int,
                start_step: int = 0) -> Iterator[tuple[torch.Tensor, list[tuple[int, ...]]]]:
        if self._loader is None:
            raise RuntimeError("AlbuBackend is closed")
        order = np.asarray(order, dtype=np.int64)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= start_step <= len(order) // batch_size:
            raise ValueError(f"start_step {start_step} is outside 0..{len(order) // batch_size}")
        return self._iterate(int(epoch), order, int(batch_size), int(start_step))

    def _iterate(self, epoch: int, order: np.ndarray, batch_size: int,
                 start_step: int) -> Iterator[tuple[torch.Tensor, list[tuple[int, ...]]]]:
        plan = self._plan  # set when iteration starts, so only the running generator owns the workers
        plan.epoch, plan.order, plan.batch_size, plan.start = epoch, order, batch_size, start_step
        if len(plan) == 0:
            return
        for images, labels, corrupt in self._loader:
            for sid, reason in corrupt:
                self.table.mark_corrupt(sid, reason)
            yield images, [tuple(x) for x in labels]  # pinning turns tuples into lists

    def close(self) -> None:
        """Stop the workers now (a stage switch builds a new backend)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self) -> None:
        if getattr(self, "_loader", None) is not None:
            self.close()
