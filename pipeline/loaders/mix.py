"""Mixup and cutmix with the official EfficientNetV2 semantics, on the device, without host syncs.

Per sample ``lam ~ Beta(alpha, alpha)``, ``lam = max(lam, 1 - lam)``, each image mixed with the
reversed batch; targets mixed the same way. Cutmix pastes a box of the partner image with side
``sqrt(1 - lam)`` of the image's, centred uniformly and clipped to the image, and corrects ``lam`` to
the box's actual area. With both on, the first half of the batch gets mixup and the second half
cutmix, each half mixed with its own reversed half (the official split). ``alpha == 0`` is exactly the
identity (no random draw at all).

The random draws (B lambdas, B box centres) are made on the host with numpy, seeded per
``(seed, epoch, step)``: torch has no public Beta sampler that takes a generator, and a handful of
floats costs one small asynchronous host-to-device copy, never a device-to-host sync. Masks and
blends are torch ops on the images' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def _lam(rng: np.random.Generator, alpha: float, n: int) -> np.ndarray:
    lam = rng.beta(alpha, alpha, n)
    return np.maximum(lam, 1.0 - lam)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (mix parameters here; images, labels and masks in the loader) on ``device``
    without blocking the host: a copy to CUDA goes from pinned memory, because a ``non_blocking`` copy
    from pageable memory is a synchronous one. ``t`` itself when it is on ``device`` already."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _to(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return to_device(torch.from_numpy(np.ascontiguousarray(x, np.float32)), like.device)


def mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float, rng: np.random.Generator):
    """Blend every sample with its partner in the reversed batch; returns new tensors."""
    lam = _to(_lam(rng, alpha, len(images)), images)
    w = lam.to(images.dtype).view(-1, 1, 1, 1)
    images = images * w + images.flip(0) * (1 - w)
    targets = targets * lam[:, None] + targets.flip(0) * (1 - lam[:, None])
    return images, targets


def cutmix(images: torch.Tensor, targets: torch.Tensor, alpha: float, rng: np.random.Generator):
    """Paste a box of the partner image (reversed batch); the target weight is the kept area."""
    n, _, h, w = images.shape
    lam = _lam(rng, alpha, n)
    cut = np.sqrt(1.0 - lam)
    ch, cw = (h * cut).astype(np.int64), (w * cut).astype(np.int64)
    cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
    y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
    x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    box = _to(np.stack([y0, y1, x0, x1, lam], 1), images)
    ys = torch.arange(h, device=images.device, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=images.device, dtype=torch.float32).view(1, 1, w)
    inside = ((ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None])
              & (xs >= box[:, 2, None, None]) & (xs < box[:, 3, None, None]))
    images = torch.where(inside[:, None], images.flip(0), images)
    lam_t = box[:, 4:5]
    targets = targets * lam_t + targets.flip(0) * (1 - lam_t)
    return images, targets


def mix_batch(images: torch.Tensor, targets: torch.Tensor, cfg: MixConfig, seed: int, epoch: int,
              step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the configured mixing to a (B, 3, S, S) batch and its (B, C) float targets."""
    if not cfg.active:
        return images, targets
    rng = np.random.default_rng([seed, epoch, step, 2])
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        half = len(images) // 2
        a = mixup(images[:half], targets[:half], cfg.mixup_alpha, rng)
        b = cutmix(images[half:], targets[half:], cfg.cutmix_alpha, rng)
        images = torch.cat([a[0], b[0]]).contiguous(memory_format=torch.channels_last)
        return images, torch.cat([a[1], b[1]])
    op = mixup if cfg.mixup_alpha > 0 else cutmix
    images, targets = op(images, targets, cfg.mixup_alpha or cfg.cutmix_alpha, rng)
    return images.contiguous(memory_format=torch.channels_last), targets
