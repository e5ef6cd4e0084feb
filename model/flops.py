"""Counting a model's cost: multiply-adds of a forward pass, and trainable parameters."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, image_size: int | tuple[int, int]) -> int:
    """Multiply-adds of one forward pass for one image of ``image_size``, the unit the EfficientNet papers
    call FLOPs (convs and the classifier; BN, activations and pooling are not counted).

    Counted, not looked up: the model's own forward runs on meta tensors (shapes only, no memory and no
    arithmetic) under PyTorch's FLOP counter, which reports 2 FLOPs per multiply-add.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    meta = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            functional_call(model, meta, (torch.empty(1, 3, h, w, device="meta"),))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, the number the official tables report."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
