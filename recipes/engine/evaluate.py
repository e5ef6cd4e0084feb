"""Evaluation: top-1/top-5 and held-out loss of a model on a shard set's split, summed over ranks.

The trainer calls it with the EMA weights after every stage; ``effnetv2 eval`` and the benchmarks call
the same function, so every number the project prints is computed here.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .config import TrainConfig


def eval_loader(cfg: TrainConfig, shards, info: distributed.DistInfo, num_classes: int, image_size: int):
    """The split ``cfg.eval_split`` at ``image_size`` with the official centre crop (or ``cfg.eval_crop``),
    every sample exactly once across ranks."""
    from effnetv2.pipeline.loaders import build_eval_loader

    batch = (cfg.eval_batch_size or cfg.batch_size) // info.world_size
    return build_eval_loader(shards, max(batch, 1), image_size, crop_ratio=cfg.eval_crop, split=cfg.eval_split,
                             device=str(info.device), backend=cfg.backend, rank=info.rank,
                             world_size=info.world_size, num_classes=num_classes, num_workers=cfg.num_workers)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, amp_dtype: torch.dtype | None, multilabel: bool) -> dict[str, float]:
    """Top-1/top-5 and cross-entropy (no smoothing) of ``model`` over ``loader``, summed over ranks.

    A prediction is correct when it is one of the sample's labels, so the same code scores multi-label
    data; there ``precision@k`` (labels among the top k, divided by k) is reported too. The loader is
    closed afterwards.
    """
    device = loader.spec.device
    num_classes = loader.spec.num_classes
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # top1, top5, hits in top5, loss, count
    k = min(5, num_classes)
    try:
        for images, targets, valid in loader:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images).float()
            hit = targets.gather(1, logits.topk(k, dim=1).indices) > 0
            soft = targets / targets.sum(1, keepdim=True).clamp_min(1.0)  # multi-hot -> sums to 1, as in training
            loss = -(soft * logits.log_softmax(1)).sum(1)
            v = valid.to(torch.float64)
            sums += torch.stack([(hit[:, 0] * v).sum(), (hit.any(1) * v).sum(), (hit.sum(1) * v).sum(),
                                 (loss * v).sum(), v.sum()])
    finally:
        loader.close()
        model.train(was_training)
    top1, top5, hits, loss_sum, n = distributed.all_reduce_sum(sums).tolist()
    n = max(n, 1.0)
    metrics = {"top1": top1 / n, "top5": top5 / n, "eval_loss": loss_sum / n, "eval_samples": int(n),
               "eval_size": loader.spec.image_size}
    if multilabel:
        metrics.update({"precision@1": top1 / n, "precision@5": hits / (k * n)})
    return metrics
