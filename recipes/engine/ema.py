"""Exponential moving average of the weights AND the BatchNorm statistics; evaluation uses it.

The official recipe averages every trainable variable and the BN moving mean/variance with TF's
``ExponentialMovingAverage(decay, num_updates=step)``, whose effective decay is
``min(decay, (1 + t) / (10 + t))``: early averages follow the model closely instead of being stuck
near the random initialisation. ``t`` is a device tensor, so the update runs inside a captured graph.
Integer buffers (``num_batches_tracked``) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema.update(model, step)`` after each optimizer step; ``ema.module`` is the averaged model."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._avg, self._copy = _split(self.module)

    def decay_at(self, step: torch.Tensor) -> torch.Tensor:
        """The effective decay for update number ``step`` (0-dim tensor), on its device."""
        t = step.to(torch.float32)
        if not self.warmup:
            return torch.full_like(t, self.decay)
        return torch.clamp((1.0 + t) / (10.0 + t), max=self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: torch.Tensor) -> None:
        """``ema = d * ema + (1 - d) * model`` for float tensors, ``ema = model`` for integer buffers."""
        src_avg, src_copy = _split(model)
        d = self.decay_at(step)
        torch._foreach_mul_(self._avg, d)
        torch._foreach_add_(self._avg, torch._foreach_mul(src_avg, 1.0 - d))
        for dst, src in zip(self._copy, src_copy):
            dst.copy_(src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def _split(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Float parameters and buffers (averaged), and the other buffers (copied), in a fixed order."""
    tensors = [p.detach() for p in model.parameters()] + list(model.buffers())
    return [t for t in tensors if t.is_floating_point()], [t for t in tensors if not t.is_floating_point()]
