"""Train and eval loaders: one API over two backends (DALI, and OpenCV + albumentations).

Public API (the project contract): :func:`build_train_loader`, :func:`build_eval_loader`,
:class:`BatchSpec`, :class:`TrainLoader`, :class:`EvalLoader`.

Every backend does the same work up to uint8 images, and this module wraps them identically:
pinned, non-blocking copy to the device; NHWC viewed as NCHW (which IS channels_last memory, no
copy); cast to ``dtype`` and normalise ``(x - 128) / 128``; targets (one-hot, or multi-hot
normalised to sum 1 for training); mixup/cutmix on the device (:mod:`.mix`). Which sample a rank
sees at which step comes from :func:`.sampler.epoch_order` (global shuffle per epoch, equal step
counts on every rank, exact resume at any sample position, also after a stage switch).

Internal backend contract (what ``backend="dali"`` and ``backend="albumentations"`` implement)::

    Backend(table: SampleTable, image_size: int, randaug_magnitude: float | None, randaug_layers: int,
            num_workers: int | None, seed: int, train: bool, crop_ratio: float | None,
            crop_area: tuple[float, float], policy: str)
    .batches(order: np.ndarray[int64], batch_size: int, epoch: int, start_step: int)
        -> Iterator[tuple[torch.Tensor, list[tuple[int, ...]]]]
    .close() -> None

* ``batches`` yields one item per step ``start_step .. len(order) // batch_size - 1``, made of the
  samples ``order[step * batch_size : (step + 1) * batch_size]`` (sample ids of ``table``), in order:
  a uint8 tensor ``(B, S, S, 3)`` (RGB, on the CPU; the DALI GPU pipeline returns it on the GPU) and
  the label tuple of every row (``table.read_sample(i)[1]``).
* Training (``train=True``), ``policy="randaugment"``: random-resized crop (:mod:`.geometry`, area
  ``crop_area``, aspect 3/4-4/3), bilinear resize to S x S, horizontal flip, RandAugment with the
  official semantics at ``randaug_magnitude`` (``None`` = off; ``0`` is level 0, not off).
  ``policy="finetune"``: whole image resized to S x S, flip, noise cutout of half-size S/4.
  Evaluation: centre crop ``geometry.eval_crop_ratio`` of the shorter side, resize to S x S; no
  randomness.
* Randomness is a function of ``(seed, epoch, step)`` (and the row), never of worker count, timing
  or how many steps were skipped, so a run resumed at ``start_step`` yields the same images.
* A sample that cannot be decoded is reported with ``table.mark_corrupt(i, reason)`` (a warning
  naming its shard and key) and its row gets labels ``()`` (image content arbitrary, shape intact);
  the loader then substitutes another row of the batch (train) or masks it (eval) and counts it in
  ``loader.num_corrupt``. A backend never raises for one bad sample.
* ``close`` frees the backend's workers/pipeline; abandoning a ``batches`` iterator midway must be
  safe (the next call starts fresh).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from effnetv2.pipeline.format.shards import ShardSet

from .geometry import AREA, check_policy
from .mix import MixConfig, mix_batch
from .sampler import SampleTable, epoch_order, steps_per_epoch

BACKENDS = ("auto", "dali", "albumentations")


@dataclass(frozen=True)
class BatchSpec:
    """What every batch looks like, known before the first one (static buffers, graph capture).

    Images are ``(batch_size, 3, image_size, image_size)`` in channels_last memory.
    """

    batch_size: int
    image_size: int
    dtype: torch.dtype
    device: torch.device
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 3, self.image_size, self.image_size)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: DALI on a GPU; on a CPU, the albumentations backend.

    The CPU rule is measured (CPU time per image, one worker, batch 64, ~360 px JPEGs, RandAugment
    n=2 m=9, 2-core machine): albumentations 0.74 / 1.20 / 1.65 ms at 128 / 224 / 300 px against
    DALI CPU 0.86 / 1.74 / 2.49 ms. OpenCV's SIMD decode-scaling, resize and LUTs beat DALI's CPU
    kernels (its bilinear warp alone is ~0.3 ms per 224 px image); on a GPU DALI wins by far.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "dali" if device.type == "cuda" and dali_available() else "albumentations"
    if backend == "dali" and not dali_available():
        raise RuntimeError("backend='dali' needs nvidia-dali (Linux x86_64/aarch64 only); "
                           "use backend='albumentations' on this platform")
    return backend


def _check_augment(policy: str, randaug_magnitude: float | None) -> str:
    check_policy(policy)
    if policy == "finetune" and randaug_magnitude is not None:
        raise ValueError("augment='finetune' (whole image, flip, noise cutout) has no RandAugment: "
                         f"pass randaug_magnitude=None, got {randaug_magnitude}")
    return policy


def check_crop_area(area: tuple[float, float]) -> tuple[float, float]:
    """The random-resized-crop area range as floats; 0 < lo <= hi <= 1, or a clear error."""
    lo, hi = (float(a) for a in area)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_area must satisfy 0 < lo <= hi <= 1, got {area}")
    return lo, hi


def _make_backend(name: str, table: SampleTable, image_size: int, magnitude: float | None, layers: int,
                  num_workers: int | None, seed: int, train: bool, crop_ratio: float | None,
                  device: torch.device, crop_area: tuple[float, float] = AREA, policy: str = "randaugment"):
    if name == "dali":
        from .dali.backend import DaliBackend

        return DaliBackend(table, image_size, magnitude, layers, num_workers, seed, train, crop_ratio,
                           device_id=device.index if device.type == "cuda" else None, crop_area=crop_area,
                           policy=policy)
    from .opencv.backend import AlbuBackend

    return AlbuBackend(table, image_size, magnitude, layers, num_workers, seed, train, crop_ratio,
                       pin_memory=device.type == "cuda", crop_area=crop_area, policy=policy)


class _Loader:
    """What train and eval loaders share: the table, the backend and turning uint8 into tensors."""

    def __init__(self, table: SampleTable, spec: BatchSpec, backend, backend_name: str, rank: int,
                 world_size: int, seed: int, drop_last: bool):
        self.table, self.spec, self.backend, self.backend_name = table, spec, backend, backend_name
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.num_corrupt = 0
        self._active: Iterator | None = None

    def __len__(self) -> int:
        return steps_per_epoch(len(self.table), self.world_size, self.spec.batch_size, self.drop_last)

    def _images(self, u8: torch.Tensor) -> torch.Tensor:
        device = self.spec.device
        if u8.device != device:
            if device.type == "cuda" and u8.device.type == "cpu" and not u8.is_pinned():
                u8 = u8.pin_memory()
            u8 = u8.to(device, non_blocking=True)
        u8 = u8.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW = channels_last
        # (x - 128) / 128 as x * 2^-7 - 1: two passes over a fresh buffer instead of three, exact in
        # fp32 and bf16 (k/128 for |k| <= 255 needs 8 significant bits).
        x = torch.empty_like(u8, dtype=self.spec.dtype, memory_format=torch.channels_last)
        return torch.mul(u8, 1.0 / 128, out=x).sub_(1.0)

    def _targets(self, labels: list[tuple[int, ...]], normalise: bool) -> torch.Tensor:
        rows = [r for r, lab in enumerate(labels) for _ in lab]
        cols = [c for lab in labels for c in lab]
        vals = [1.0 / len(lab) if normalise else 1.0 for lab in labels for _ in lab]
        if cols and (min(cols) < 0 or max(cols) >= self.spec.num_classes):
            raise ValueError(f"{self.table.files[0].parent}: class id {max(cols)} outside "
                             f"0..{self.spec.num_classes - 1}; pass the right num_classes")
        device = self.spec.device
        t = torch.zeros(len(labels), self.spec.num_classes, device=device)
        index = torch.tensor([rows, cols], dtype=torch.int64).to(device, non_blocking=True)
        t.index_put_((index[0], index[1]), torch.tensor(vals).to(device, non_blocking=True))
        return t

    def _bad_rows(self, ids: np.ndarray, labels: list[tuple[int, ...]]) -> list[int]:
        bad = [r for r, lab in enumerate(labels) if not lab]
        for r in bad:
            self.table.mark_corrupt(int(ids[r]), "the backend could not decode it")
        self.num_corrupt += len(bad)
        return bad

    def _start(self, iterator: Iterator) -> Iterator:
        self._stop()
        self._active = iterator
        return iterator

    def _stop(self) -> None:
        if self._active is not None:
            self._active.close()  # type: ignore[attr-defined]
            self._active = None

    def close(self) -> None:
        """Free the backend (workers, DALI pipeline and its device memory): call at a stage switch."""
        self._stop()
        self.backend.close()
        self.table.close()


class TrainLoader(_Loader):
    """Yields one epoch of ``(images, targets)`` per ``iter()``; see :func:`build_train_loader`."""

    def __init__(self, *args, mix: MixConfig, **kwargs):
        super().__init__(*args, drop_last=True, **kwargs)
        self.mix = mix
        self.epoch, self._position = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch``; the current epoch (e.g. just restored) keeps its position."""
        if epoch != self.epoch:
            self.epoch, self._position = int(epoch), 0

    def state_dict(self) -> dict:
        b = self.spec.batch_size
        if self._position >= len(self) * b:
            return {"epoch": self.epoch + 1, "step": 0, "sample": 0}
        return {"epoch": self.epoch, "step": self._position // b, "sample": self._position}

    def load_state_dict(self, state: dict) -> None:
        """Resume at exactly that sample position (``sample`` wins over ``step``, so a loader with
        another batch size, e.g. the next stage's, continues where the previous one stopped)."""
        self.epoch = int(state["epoch"])
        self._position = int(state.get("sample", int(state["step"]) * self.spec.batch_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._start(self._epoch())

    def _epoch(self):
        b, epoch, start = self.spec.batch_size, self.epoch, self._position
        order = epoch_order(len(self.table), self.seed, epoch, self.rank, self.world_size, b)
        first_step, offset = divmod(start, b)
        order = order[offset:]
        for k, (u8, labels) in enumerate(self.backend.batches(order, b, epoch, first_step)):
            step = first_step + k
            ids = order[step * b : (step + 1) * b]
            bad = self._bad_rows(ids, labels)
            if bad:
                u8, labels = _substitute(u8, labels, bad)
            images = self._images(u8)
            targets = self._targets(labels, normalise=True)
            images, targets = mix_batch(images, targets, self.mix, self.seed, epoch, step)
            self._position = start + (k + 1) * b
            yield images, targets
        if self.epoch == epoch:
            self.epoch, self._position = epoch + 1, 0


class EvalLoader(_Loader):
    """Yields ``(images, targets, valid)``: every sample of the split exactly once across ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, seed=0, drop_last=False, **kwargs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self._start(self._epoch())

    def _epoch(self):
        b = self.spec.batch_size
        order = epoch_order(len(self.table), 0, 0, self.rank, self.world_size, b, drop_last=False,
                            shuffle=False)
        valid = order >= 0
        filled = np.where(valid, order, order[0] if valid[0] else 0)
        for step, (u8, labels) in enumerate(self.backend.batches(filled, b, 0, 0)):
            ids, ok = filled[step * b : (step + 1) * b], valid[step * b : (step + 1) * b].copy()
            bad = self._bad_rows(ids[ok], [lab for lab, v in zip(labels, ok) if v])
            ok[np.flatnonzero(ok)[bad]] = False
            labels = [lab if v else () for lab, v in zip(labels, ok)]
            mask = torch.from_numpy(ok).to(self.spec.device, non_blocking=True)
            yield self._images(u8), self._targets(labels, normalise=False), mask


def _substitute(u8: torch.Tensor, labels: list, bad: list[int]):
    """Replace undecodable rows by the nearest good row before them (after, for leading ones)."""
    good = [r for r in range(len(labels)) if labels[r]]
    if not good:
        raise RuntimeError("a whole batch of undecodable samples; see the warnings above")
    donors = [max([g for g in good if g < r], default=good[0]) for r in bad]
    u8 = u8.clone()
    u8[bad] = u8[donors]
    labels = list(labels)
    for r, d in zip(bad, donors):
        labels[r] = labels[d]
    return u8, labels


ShardsArg = str | Path | ShardSet | Sequence[str | Path]


def _common(shards: ShardsArg, split: str, batch_size: int, image_size: int, num_classes: int | None,
            device, backend: str, rank: int, world_size: int, dtype: torch.dtype):
    if batch_size < 1 or image_size < 8:
        raise ValueError(f"batch_size must be >= 1 and image_size >= 8, got {batch_size}, {image_size}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    table = SampleTable.from_shards(shards, split, num_classes)
    spec = BatchSpec(batch_size, image_size, dtype, device, table.num_classes)
    return table, spec, resolve_backend(backend, device)


def build_train_loader(shards: ShardsArg, batch_size: int, image_size: int, randaug_magnitude: float | None,
                       mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, *, num_classes: int | None = None,
                       device="cpu", backend: str = "auto", rank: int = 0, world_size: int = 1, seed: int = 0,
                       dtype: torch.dtype = torch.float32, randaug_layers: int = 2, split: str = "train",
                       num_workers: int | None = None, crop_area: tuple[float, float] = AREA,
                       augment: str = "randaugment") -> TrainLoader:
    """The training loader for one stage: ``len(loader)`` steps per epoch on every rank.

    ``shards``: a shard-set directory (or :class:`ShardSet`) and ``split``, or a list of tar files
    (then ``num_classes`` is required). ``randaug_magnitude=None`` turns RandAugment off.
    ``num_workers``: DALI threads or DataLoader workers (default: the CPUs this process may use).
    ``crop_area``: the random-resized-crop area range (official 0.05-1; small, centred images such as
    Fashion-MNIST keep more of the object with a larger lower bound).
    ``augment``: ``"randaugment"`` (random-resized crop, flip, RandAugment: training from scratch) or
    ``"finetune"`` (whole image, flip, noise cutout of half-size S/4: fine-tuning and transfer, facts
    §4; needs ``randaug_magnitude=None``).
    """
    table, spec, name = _common(shards, split, batch_size, image_size, num_classes, device, backend, rank,
                                world_size, dtype)
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup/cutmix alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
    workers = len(os.sched_getaffinity(0)) if num_workers is None else num_workers
    be = _make_backend(name, table, image_size, randaug_magnitude, randaug_layers, workers, seed, True, None,
                       spec.device, check_crop_area(crop_area), _check_augment(augment, randaug_magnitude))
    return TrainLoader(table, spec, be, name, rank, world_size, seed, mix=MixConfig(mixup_alpha, cutmix_alpha))


def build_eval_loader(shards: ShardsArg, batch_size: int, image_size: int, *, crop_ratio: float | None = None,
                      split: str = "val", device="cpu", backend: str = "auto", rank: int = 0, world_size: int = 1,
                      dtype: torch.dtype = torch.float32, num_classes: int | None = None,
                      num_workers: int | None = None) -> EvalLoader:
    """The evaluation loader: centre crop ``S/(S+32)`` below 320 px, whole image from 320 px (official),
    or ``crop_ratio``; padding rows of the last step have ``valid=False``."""
    table, spec, name = _common(shards, split, batch_size, image_size, num_classes, device, backend, rank,
                                world_size, dtype)
    workers = len(os.sched_getaffinity(0)) if num_workers is None else num_workers
    be = _make_backend(name, table, image_size, None, 0, workers, 0, False, crop_ratio, spec.device)
    return EvalLoader(table, spec, be, name, rank, world_size)
