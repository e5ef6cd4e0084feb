"""Learning-rate schedules, evaluated on a device tensor so that a captured step needs no host value.

The released code's semantics (``WarmupLearningRateSchedule``): the decay is a function of the global
step counted from 0, not from the end of warm-up, and warm-up replaces it while ``step < warmup``::

    exponential  lr = base * rate ** floor(step / (decay_epochs * steps_per_epoch))   (staircase)
    cosine       lr = base * 0.5 * (1 + cos(pi * step / total_steps))
    constant     lr = base
    warm-up      lr = base * step / warmup_steps        while step < warmup_steps

``base`` scales with the global batch: ``lr_per_256 * global_batch / 256``. ``min_lr`` floors the
decayed value (not the warm-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("exponential", "cosine", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """``schedule(step_tensor) -> lr_tensor`` (float32, same device); ``schedule.at(step) -> float``."""

    kind: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_steps: float = 1.0  # exponential: steps between two decays (may be fractional: 2.4 epochs)
    decay_rate: float = 0.97
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown lr schedule {self.kind!r}; choose one of {KINDS}")
        if self.kind == "exponential" and self.decay_steps <= 0:
            raise ValueError(f"exponential decay needs decay_steps > 0, got {self.decay_steps}")
        if self.kind == "cosine" and self.total_steps <= 0:
            raise ValueError(f"cosine decay needs total_steps > 0, got {self.total_steps}")

    def __call__(self, step: torch.Tensor) -> torch.Tensor:
        """The LR at ``step`` (an integer device tensor), computed on the device: no host sync."""
        s = step.to(torch.float32)
        if self.kind == "exponential":
            lr = self.base_lr * torch.pow(torch.full_like(s, self.decay_rate), torch.floor(s / self.decay_steps))
        elif self.kind == "cosine":
            lr = self.base_lr * 0.5 * (1.0 + torch.cos(s * (math.pi / self.total_steps)))
        else:
            lr = torch.full_like(s, self.base_lr)
        if self.min_lr:
            lr = torch.clamp(lr, min=self.min_lr)
        if self.warmup_steps:
            lr = torch.where(s < self.warmup_steps, s * (self.base_lr / self.warmup_steps), lr)
        return lr

    def at(self, step: int) -> float:
        """The same LR on the host, for logging and tests."""
        return float(self(torch.tensor(step, dtype=torch.int64)))


def make_schedule(kind: str, *, lr_per_256: float, global_batch: int, steps_per_epoch: int, total_steps: int,
                  warmup_epochs: float = 0.0, decay_epochs: float = 2.4, decay_rate: float = 0.97,
                  min_lr: float = 0.0) -> LRSchedule:
    """A schedule from the recipes' units (epochs, LR per 256 images) to steps."""
    return LRSchedule(kind, lr_per_256 * global_batch / 256, total_steps,
                      warmup_steps=int(warmup_epochs * steps_per_epoch),
                      decay_steps=decay_epochs * steps_per_epoch, decay_rate=decay_rate, min_lr=min_lr)
