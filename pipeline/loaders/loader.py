"""Train and eval loaders: one API over the backends (:mod:`.backend` is their contract).

Public API: :func:`build_train_loader`, :func:`build_eval_loader`, :class:`BatchSpec`,
:class:`TrainLoader`, :class:`EvalLoader`.

A backend makes uint8 images; this module does the rest identically for all of them: pinned,
non-blocking copy to the device; NHWC viewed as NCHW (which IS channels_last memory, no copy); cast
to ``dtype`` and normalise ``(x - 128) / 128``; targets (one-hot, or multi-hot normalised to sum 1 for
training); mixup/cutmix on the device (:mod:`.mix`); undecodable samples substituted (train) or
masked (eval). Which sample a rank sees at which step comes from :func:`.sampler.epoch_order`
(global shuffle per epoch, equal step counts on every rank, exact resume at any sample position,
also after a stage switch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from effnetv2.pipeline.format.shards import ShardSet

from . import forks
from .backend import AugmentSpec, make_backend, resolve_backend
from .geometry import AREA
from .mix import MixConfig, mix_batch, to_device
from .sampler import SampleTable, epoch_order, steps_per_epoch


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


class _Loader:
    """What train and eval loaders share: the table, the backend and turning uint8 into tensors."""

    def __init__(self, table: SampleTable, spec: BatchSpec, backend, backend_name: str, rank: int,
                 world_size: int, seed: int, drop_last: bool):
        self.table, self.spec, self.backend, self.backend_name = table, spec, backend, backend_name
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.num_corrupt = 0
        self._active: Iterator | None = None
        self._pid = forks.register(self)

    def __len__(self) -> int:
        return steps_per_epoch(len(self.table), self.world_size, self.spec.batch_size, self.drop_last)

    def _images(self, u8: torch.Tensor) -> torch.Tensor:
        u8 = to_device(u8, self.spec.device).permute(0, 3, 1, 2)  # NHWC memory seen as NCHW = channels_last
        # (x - 128) / 128 as x * 2^-7 - 1: two passes over a fresh buffer instead of three, exact in
        # fp32 and bf16 (k/128 for |k| <= 255 needs 8 significant bits).
        x = torch.empty_like(u8, dtype=self.spec.dtype, memory_format=torch.channels_last)
        return torch.mul(u8, 1.0 / 128, out=x).sub_(1.0)

    def _targets(self, labels: list[tuple[int, ...]], normalise: bool) -> torch.Tensor:
        rows = [r for r, lab in enumerate(labels) for _ in lab]
        cols = [c for lab in labels for c in lab]
        vals = [1.0 / len(lab) if normalise else 1.0 for lab in labels for _ in lab]
        bad = next((c for c in cols if not 0 <= c < self.spec.num_classes), None)
        if bad is not None:  # _bad_rows names the sample; this guards callers that skip it
            raise ValueError(f"{self.table.files[0].parent}: class id {bad} outside "
                             f"0..{self.spec.num_classes - 1}; pass the right num_classes")
        device = self.spec.device
        t = torch.zeros(len(labels), self.spec.num_classes, device=device)
        index = to_device(torch.tensor([rows, cols], dtype=torch.int64), device)
        t.index_put_((index[0], index[1]), to_device(torch.tensor(vals), device))
        return t

    def _bad_rows(self, ids: np.ndarray, labels: list[tuple[int, ...]]) -> list[int]:
        """Rows the backend could not decode (reported, to be substituted or masked); a class id outside
        the class count is an error naming the sample (a wrong ``num_classes`` or a damaged shard)."""
        n = self.spec.num_classes
        for r, lab in enumerate(labels):
            bad = next((c for c in lab if not 0 <= c < n), None)
            if bad is not None:
                raise ValueError(f"{self.table.describe(int(ids[r]))}: class id {bad} outside 0..{n - 1}; pass "
                                 f"the right num_classes, or re-shard if the shard is damaged")
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
        """Free the backend (workers, DALI pipeline and its device memory): call at a stage switch.
        A no-op in a forked child: what the loader holds belongs to the process that made it."""
        if not forks.owned(self._pid):
            return
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
            mask = to_device(torch.from_numpy(ok), self.spec.device)
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
    name = resolve_backend(backend, device)
    table = SampleTable.from_shards(shards, split, num_classes)
    return table, BatchSpec(batch_size, image_size, dtype, device, table.num_classes), name


def build_train_loader(shards: ShardsArg, batch_size: int, image_size: int, randaug_magnitude: float | None,
                       mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, *, num_classes: int | None = None,
                       device="cpu", backend: str = "auto", rank: int = 0, world_size: int = 1, seed: int = 0,
                       dtype: torch.dtype = torch.float32, randaug_layers: int = 2, split: str = "train",
                       num_workers: int | None = None, crop_area: tuple[float, float] = AREA,
                       augment: str = "randaugment") -> TrainLoader:
    """The training loader for one stage: ``len(loader)`` steps per epoch on every rank.

    ``shards``: a shard-set directory (or :class:`ShardSet`) and ``split``, or a list of tar files
    (then ``num_classes`` is required). ``randaug_magnitude=None`` turns RandAugment off.
    ``num_workers``: DALI threads or DataLoader workers (default: this rank's share of the cores,
    :func:`.backend.default_workers`).
    ``crop_area``: the random-resized-crop area range (official 0.05-1; small, centred images such as
    Fashion-MNIST keep more of the object with a larger lower bound).
    ``augment``: ``"randaugment"`` (random-resized crop, flip, RandAugment: training from scratch) or
    ``"finetune"`` (whole image, flip, noise cutout of half-size S/4: the official fine-tuning and
    transfer augmentation; needs ``randaug_magnitude=None``).
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup/cutmix alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
    aug = AugmentSpec(image_size, True, augment, None if randaug_magnitude is None else float(randaug_magnitude),
                      randaug_layers, tuple(float(a) for a in crop_area), None, seed)
    table, spec, name = _common(shards, split, batch_size, image_size, num_classes, device, backend, rank,
                                world_size, dtype)
    be = make_backend(name, table, aug, spec.device, num_workers)
    return TrainLoader(table, spec, be, name, rank, world_size, seed, mix=MixConfig(mixup_alpha, cutmix_alpha))


def build_eval_loader(shards: ShardsArg, batch_size: int, image_size: int, *, crop_ratio: float | None = None,
                      split: str = "val", device="cpu", backend: str = "auto", rank: int = 0, world_size: int = 1,
                      dtype: torch.dtype = torch.float32, num_classes: int | None = None,
                      num_workers: int | None = None) -> EvalLoader:
    """The evaluation loader: centre crop ``S/(S+32)`` below 320 px, whole image from 320 px (official),
    or ``crop_ratio``; padding rows of the last step have ``valid=False``."""
    aug = AugmentSpec(image_size, False, crop_ratio=crop_ratio)
    table, spec, name = _common(shards, split, batch_size, image_size, num_classes, device, backend, rank,
                                world_size, dtype)
    be = make_backend(name, table, aug, spec.device, num_workers)
    return EvalLoader(table, spec, be, name, rank, world_size)
