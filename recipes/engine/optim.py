"""RMSProp with TensorFlow semantics, written to be captured in a CUDA graph.

``torch.optim.RMSprop`` differs from the TF optimizer the official recipe was tuned with in three ways
(eps outside the root, accumulator starting at 0, LR applied after the momentum); with eps = 1e-3 and
LR 0.256 that changes training. This one does, per parameter (TF ``ApplyRMSProp``)::

    g   = grad + weight_decay * param          (L2 in the loss: d/dp wd/2 |p|^2; not on biases and norms)
    ms  = rho * ms + (1 - rho) * g^2           (ms starts at 1)
    mom = momentum * mom + lr * g / sqrt(ms + eps)
    p   = p - mom

The LR is a device tensor passed to :meth:`RMSpropTF.step`, the state is allocated in ``__init__``,
and every update is a ``torch._foreach_*`` kernel: nothing reads a value back to the host, so the
whole update can live inside a captured graph. With fp16 loss scaling ``skip`` (a device bool) turns
an update with overflowed gradients into an exact no-op, again without a host branch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: conv/linear kernels get ``weight_decay``; biases and norm scales/shifts
    (every parameter with fewer than 2 dimensions) get none, as in the official code."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class RMSpropTF(torch.optim.Optimizer):
    """TF-semantics RMSProp; ``step(lr)`` takes the learning rate as a 0-dim device tensor."""

    def __init__(self, params: Iterable, *, rho: float = 0.9, momentum: float = 0.9, eps: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        if not 0.0 <= rho < 1.0 or not 0.0 <= momentum < 1.0 or eps <= 0.0 or weight_decay < 0.0:
            raise ValueError(f"invalid RMSpropTF hyper-parameters: rho={rho} momentum={momentum} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(rho=rho, momentum=momentum, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {"square_avg": torch.ones_like(p), "momentum_buffer": torch.zeros_like(p)}

    @torch.no_grad()
    def step(self, lr: torch.Tensor, skip: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """One update with learning rate ``lr``; parameters without a gradient are left alone.

        ``skip`` (0-dim bool tensor): when true the parameters and the state stay exactly as they are.
        """
        keep = None if skip is None else (~skip).to(torch.float32)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            square = [self.state[p]["square_avg"] for p in params]
            moms = [self.state[p]["momentum_buffer"] for p in params]
            rho, momentum = group["rho"], group["momentum"]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if keep is not None:
                for g in grads:  # overflowed fp16 gradients: make them finite, then zero when skipping
                    g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                torch._foreach_mul_(grads, keep)
            if keep is None:
                torch._foreach_mul_(square, rho)
            else:  # rho -> 1 when skipping, so that ms * 1 + (1 - rho) * 0 = ms
                torch._foreach_mul_(square, torch.where(skip, 1.0, rho))
            torch._foreach_addcmul_(square, grads, grads, value=1.0 - rho)
            denom = torch._foreach_add(square, group["eps"])
            torch._foreach_sqrt_(denom)
            update = torch._foreach_div(grads, denom)
            torch._foreach_mul_(update, lr)
            if keep is None:
                torch._foreach_mul_(moms, momentum)
            else:
                torch._foreach_mul_(moms, torch.where(skip, 1.0, momentum))
            torch._foreach_add_(moms, update)
            if keep is None:
                torch._foreach_sub_(params, moms)
            else:
                torch._foreach_sub_(params, torch._foreach_mul(moms, keep))
