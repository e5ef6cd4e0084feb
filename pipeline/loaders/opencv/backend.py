"""The OpenCV backend: torch DataLoader workers decode and augment whole batches with OpenCV and numpy.

It runs wherever DALI does not (macOS, Windows, CPU-only machines) and is the CPU peer DALI must beat;
it implements :class:`~effnetv2.pipeline.loaders.backend.Backend` and turns sample ids into uint8 NHWC
batches, nothing more. One DataLoader item is one whole batch, written into one shared-memory tensor;
randomness is per (seed, epoch, sample id); JPEGs are decoded at a reduced size when the crop allows
(libjpeg's DCT scaling), then cropped, resized, flipped and augmented with the official RandAugment
(:mod:`.randaugment`). Why each of these, and why albumentations' own transforms are not used: see
docs/pipeline.md ("The OpenCV backend").
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from effnetv2.pipeline.format.jpeg import check_pixels, jpeg_size

from .. import forks
from ..backend import AugmentSpec, default_workers
from ..geometry import Window, centre_crop_window, noise_cutout, random_crop_window
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
class _BatchDataset(Dataset):
    """Map-style dataset whose index is ``(epoch, ids)`` and whose item is one finished batch."""

    def __init__(self, table: SampleTable, spec: AugmentSpec, reduced_decode: bool):
        self.table = table
        self.spec = spec
        self.reduced_decode = reduced_decode
        self.randaug = RandAugment(spec.randaug_magnitude, spec.layers) if spec.layers else None

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
        try:
            check_pixels(*src_hw)  # the same limit as DALI's source (checked_jpeg_size), before decoding
        except ValueError as e:
            return str(e)
        if spec.train and not spec.finetune:
            window = random_crop_window(rng, *src_hw, spec.crop_area)
        else:
            window = centre_crop_window(*src_hw, 1.0 if spec.train else spec.eval_ratio)
        if img is None:
            img = decode(data, reduction(window, size) if self.reduced_decode else 1)
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
class OpenCVBackend:
    """The :class:`~effnetv2.pipeline.loaders.backend.Backend` on torch DataLoader workers.

    One iteration at a time: a new ``batches()`` call abandons the previous one. ``num_workers=0``
    decodes in the calling process. ``pin_memory=True`` when the batches go to a CUDA device (pinned in
    the DataLoader's thread, off the training loop). ``reduced_decode=False`` always decodes at full size.
    """

    name = "opencv"

    def __init__(self, table: SampleTable, spec: AugmentSpec, *, num_workers: int | None = None,
                 pin_memory: bool = False, reduced_decode: bool = True, prefetch_factor: int = 2):
        self.table, self.spec = table, spec
        self._pid = forks.register(self)  # workers are this process's: a forked child must not stop them
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self._plan = _BatchPlan()
        workers = self.num_workers > 0
        self._loader: DataLoader | None = DataLoader(
            _BatchDataset(table, spec, reduced_decode), batch_size=None, sampler=self._plan,
            num_workers=self.num_workers, collate_fn=_as_is, pin_memory=pin_memory,
            worker_init_fn=_init_worker if workers else None, persistent_workers=workers,
            prefetch_factor=prefetch_factor if workers else None,
            generator=torch.Generator())  # its seed draws must not advance the trainer's global torch RNG

    @property
    def num_corrupt(self) -> int:
        """Undecodable samples met so far (each reported once, with its shard and key)."""
        return len(self.table.corrupt)

    def batches(self, order: np.ndarray, batch_size: int, epoch: int,
                start_step: int = 0) -> Iterator[tuple[torch.Tensor, list[tuple[int, ...]]]]:
        if self._loader is None:
            raise RuntimeError("OpenCVBackend is closed")
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
        """Stop the workers now (a stage switch builds a new backend); a no-op in a forked child."""
        if not forks.owned(self._pid):
            return
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self) -> None:
        if getattr(self, "_loader", None) is not None and forks.owned(self._pid):
            self.close()
