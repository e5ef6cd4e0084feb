"""The contract between the loader and its backends: one spec of the augmentation, one protocol.

A backend turns sample ids into uint8 images; the loader (:mod:`.loader`) does the rest the same way
for all of them (device copy, normalisation, targets, mixup/cutmix, corrupt-sample handling). Two
backends implement :class:`Backend`: ``dali`` (:class:`.dali.backend.DaliBackend`, GPU or CPU) and
``opencv`` (:class:`.opencv.backend.OpenCVBackend`; ``albumentations`` is accepted as its old name).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .geometry import AREA, POLICIES, eval_crop_ratio

if TYPE_CHECKING:
    import torch

    from .sampler import SampleTable

BACKENDS = ("auto", "dali", "opencv")
ALIASES = {"albumentations": "opencv"}  # the OpenCV backend's name before it said what it is


@dataclass(frozen=True)
class AugmentSpec:
    """What a backend makes of one sample: the same fields for every backend.

    Training, ``policy="randaugment"``: random-resized crop (area ``crop_area``, aspect 3/4-4/3; see
    :mod:`.geometry`), bilinear resize to S x S, horizontal flip, then RandAugment with the official
    semantics at ``randaug_magnitude`` (``None``: off; ``0`` is level 0, not off), ``randaug_layers``
    layers. ``policy="finetune"``: whole image resized to S x S, flip, noise cutout of half-size S/4.
    Evaluation (``train=False``): centre crop of ratio :attr:`eval_ratio`, resize to S x S, nothing random.
    """

    image_size: int
    train: bool
    policy: str = "randaugment"
    randaug_magnitude: float | None = None
    randaug_layers: int = 2
    crop_area: tuple[float, float] = AREA
    crop_ratio: float | None = None  # eval; None = the official rule (geometry.eval_crop_ratio)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.policy not in POLICIES:
            raise ValueError(f"augment policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "finetune" and self.randaug_magnitude is not None:
            raise ValueError("augment='finetune' (whole image, flip, noise cutout) has no RandAugment: "
                             f"pass randaug_magnitude=None, got {self.randaug_magnitude}")
        lo, hi = self.crop_area
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_area must satisfy 0 < lo <= hi <= 1, got {self.crop_area}")
        if self.randaug_layers < 0:
            raise ValueError(f"randaug_layers must be >= 0, got {self.randaug_layers}")
        eval_crop_ratio(self.image_size, self.crop_ratio)  # raises on a ratio outside (0, 1]

    @property
    def finetune(self) -> bool:
        return self.train and self.policy == "finetune"

    @property
    def layers(self) -> int:
        """RandAugment layers actually applied (0 when off, in fine-tuning and in evaluation)."""
        on = self.train and not self.finetune and self.randaug_magnitude is not None
        return self.randaug_layers if on else 0

    @property
    def eval_ratio(self) -> float:
        return eval_crop_ratio(self.image_size, self.crop_ratio)


class Backend(Protocol):
    """What :mod:`.loader` needs of a backend.

    * ``batches(order, batch_size, epoch, start_step)`` yields one item per step ``start_step ..
      len(order) // batch_size - 1``, made of the samples ``order[step * batch_size : (step + 1) *
      batch_size]`` (ids of the backend's :class:`~.sampler.SampleTable`; ids < 0 are padding), in
      order: a uint8 tensor ``(B, S, S, 3)`` (RGB; on the GPU for DALI's GPU pipeline, else on the CPU)
      and the label tuple of every row.
    * Randomness is a deterministic function of the spec's seed, the epoch and the sample's place,
      never of worker or thread count or timing, so a run resumed at ``start_step`` gets the same images.
      The place differs by backend: OpenCV draws per (epoch, sample id), so a sample gets the same
      augmentation whatever the batch size or rank layout; DALI draws per (epoch, step) for the batch,
      so it depends on the batch the sample lands in. The two backends therefore give different (each
      reproducible) augmentations for the same seed.
    * A sample that cannot be decoded is reported once (``table.mark_corrupt``) and its row gets labels
      ``()`` (image content arbitrary, shape intact); a backend never raises for one bad sample.
    * Abandoning a ``batches`` iterator midway is safe (the next call starts fresh); ``close`` frees the
      workers or the pipeline and its device memory, and is idempotent.
    """

    name: str
    spec: AugmentSpec

    def batches(self, order: np.ndarray, batch_size: int, epoch: int,
                start_step: int = 0) -> Iterator[tuple[torch.Tensor, list[tuple[int, ...]]]]: ...

    def close(self) -> None: ...


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: DALI on a GPU, the OpenCV backend on a CPU, where it measured faster than DALI's CPU
    operators (bench/RESULTS.md, "backend choice")."""
    backend = ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "dali" if device.type == "cuda" and dali_available() else "opencv"
    if backend == "dali" and not dali_available():
        raise RuntimeError("backend='dali' needs nvidia-dali (Linux x86_64/aarch64 only); "
                           "use backend='opencv' on this platform")
    return backend


def default_workers(world_size_on_node: int | None = None) -> int:
    """This rank's share of the CPU cores it may use (cores / ranks on the node, at least 1): the DALI
    threads or DataLoader workers of a loader built with ``num_workers=None``.

    The ranks on the node default to torchrun's ``LOCAL_WORLD_SIZE`` (1 without torchrun): torchrun's
    processes share one CPU affinity, and every rank taking all of it would oversubscribe the cores
    N-fold and multiply the DALI decoder's per-thread buffers by N. A launcher that pins each rank to
    its own cores already gives it its share: pass ``num_workers`` there.
    """
    if world_size_on_node is None:
        text = os.environ.get("LOCAL_WORLD_SIZE", "1")
        try:
            world_size_on_node = int(text)
        except ValueError:
            raise ValueError(f"LOCAL_WORLD_SIZE={text!r} is not a number of processes") from None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(world_size_on_node, 1))


def make_backend(name: str, table: SampleTable, spec: AugmentSpec, device: torch.device,
                 num_workers: int | None) -> Backend:
    """The resolved backend ``name`` for ``spec``; ``num_workers`` DALI threads or DataLoader workers."""
    workers = default_workers() if num_workers is None else num_workers
    if name == "dali":
        from .dali.backend import DaliBackend

        return DaliBackend(table, spec, device_id=device.index if device.type == "cuda" else None,
                           num_threads=max(workers, 1))
    from .opencv.backend import OpenCVBackend

    return OpenCVBackend(table, spec, num_workers=workers, pin_memory=device.type == "cuda")
