"""Evaluation: top-1/top-5 and held-out loss of a model on a shard set's split, summed over ranks.

The trainer calls :func:`evaluate` with the EMA weights after every stage; ``effnetv2 eval`` and the
benchmarks call the same code (:func:`run_evaluation`, which adds flip TTA, the confusion matrix and
multi-label average precision on request), so every number the project prints is computed here.

Every sample counts once over all ranks: the eval loader pads the last batch of each rank and marks
the padding ``valid=False``; sums, confusion counts and the scores for average precision are taken over
valid rows only and then reduced (summed, or gathered) over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .config import TrainConfig

TTA = ("flip",)
SCORES = ("softmax", "sigmoid")
_AP_CHUNK = 512  # classes per sort in average_precision: bounds the temporaries to N x 512


def eval_loader(cfg: TrainConfig, shards, info: distributed.DistInfo, num_classes: int, image_size: int):
    """The split ``cfg.eval_split`` at ``image_size`` with the official centre crop (or ``cfg.eval_crop``),
    every sample exactly once across ranks."""
    from effnetv2.pipeline.loaders import build_eval_loader

    batch = (cfg.eval_batch_size or cfg.batch_size) // info.world_size
    return build_eval_loader(shards, max(batch, 1), image_size, crop_ratio=cfg.eval_crop, split=cfg.eval_split,
                             device=str(info.device), backend=cfg.backend, rank=info.rank,
                             world_size=info.world_size, num_classes=num_classes, num_workers=cfg.num_workers)


@dataclass
class Evaluation:
    """What :func:`run_evaluation` measured; the tensors are on the CPU and equal on every rank."""

    metrics: dict[str, float]
    confusion: torch.Tensor | None = None  # (C, C) int64: row = true class, column = top-1 prediction
    class_ap: torch.Tensor | None = None  # (C,) float64 average precision; NaN for a class without positives
    class_positives: torch.Tensor | None = None  # (C,) int64 samples that carry each label


def evaluate(model: nn.Module, loader, *, amp_dtype: torch.dtype | None, multilabel: bool) -> dict[str, float]:
    """Top-1/top-5 and cross-entropy (no smoothing) of ``model`` over ``loader``, summed over ranks.

    A prediction is correct when it is one of the sample's labels, so the same code scores multi-label
    data; there ``precision@k`` (labels among the top k, divided by k) is reported too. The loader is
    closed afterwards.
    """
    return run_evaluation(model, loader, amp_dtype=amp_dtype, multilabel=multilabel).metrics


def tta_logits(model: nn.Module, images: torch.Tensor, tta: str | None) -> torch.Tensor:
    """fp32 logits of ``images``; with ``tta="flip"`` the mean of the image's and its mirror's logits."""
    logits = model(images).float()
    if tta == "flip":
        logits = (logits + model(images.flip(3)).float()) / 2
    elif tta is not None:
        raise ValueError(f"tta must be one of {', '.join(TTA)} or None, got {tta!r}")
    return logits


@torch.no_grad()
def run_evaluation(model: nn.Module, loader, *, amp_dtype: torch.dtype | None, multilabel: bool,
                   tta: str | None = None, confusion: bool = False, average_precision: bool = False,
                   scores: str = "softmax", progress: bool = False) -> Evaluation:
    """:func:`evaluate`, plus on request: flip TTA, the confusion matrix of the top-1 predictions
    (single-label sets), and average precision per class with its mean (``mAP``, over the classes that
    have a positive sample; the ranking is by ``scores`` of the logits: softmax for a model trained with
    the softmax loss, sigmoid for BCE). Average precision needs every score: ``samples x classes`` fp32
    on the host (1 GB for 12k samples of ImageNet-21k), gathered on every rank.
    """
    if confusion and multilabel:
        raise ValueError("a confusion matrix needs single-label data; this split is multi-label")
    if scores not in SCORES:
        raise ValueError(f"scores must be one of {', '.join(SCORES)}, got {scores!r}")
    device = loader.spec.device
    num_classes = loader.spec.num_classes
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # top1, top5, hits in top5, loss, count
    counts = torch.zeros(num_classes * num_classes if confusion else 0, dtype=torch.int64, device=device)
    kept_scores: list[torch.Tensor] = []
    kept_labels: list[torch.Tensor] = []
    k = min(5, num_classes)
    total = len(loader.table)  # the whole split, over all ranks
    bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True, desc="eval")
    try:
        for images, targets, valid in loader:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = tta_logits(model, images, tta)
            top = logits.topk(k, dim=1).indices
            hit = targets.gather(1, top) > 0
            soft = targets / targets.sum(1, keepdim=True).clamp_min(1.0)  # multi-hot -> sums to 1, as in training
            loss = -(soft * logits.log_softmax(1)).sum(1)
            v = valid.to(torch.float64)
            sums += torch.stack([(hit[:, 0] * v).sum(), (hit.any(1) * v).sum(), (hit.sum(1) * v).sum(),
                                 (loss * v).sum(), v.sum()])
            if confusion:
                truth = targets.argmax(1)[valid]
                counts += torch.bincount(truth * num_classes + top[valid, 0], minlength=num_classes ** 2)
            if average_precision:
                prob = logits.softmax(1) if scores == "softmax" else logits.sigmoid()
                kept_scores.append(prob[valid].cpu())
                kept_labels.append((targets[valid] > 0).cpu())
            bar.update(min(images.shape[0] * loader.world_size, total - bar.n))
    finally:
        bar.close()
        loader.close()
        model.train(was_training)
    top1, top5, hits, loss_sum, n = distributed.all_reduce_sum(sums).tolist()
    n = max(n, 1.0)
    metrics = {"top1": top1 / n, "top5": top5 / n, "eval_loss": loss_sum / n, "eval_samples": int(n),
               "eval_size": loader.spec.image_size}
    if multilabel:
        metrics.update({"precision@1": top1 / n, "precision@5": hits / (k * n)})
    result = Evaluation(metrics)
    if confusion:
        result.confusion = distributed.all_reduce_sum(counts).view(num_classes, num_classes).cpu()
    if average_precision:
        mine = (torch.cat(kept_scores) if kept_scores else torch.zeros(0, num_classes),
                torch.cat(kept_labels) if kept_labels else torch.zeros(0, num_classes, dtype=torch.bool))
        parts = distributed.gather(mine)
        all_scores = torch.cat([s for s, _ in parts])
        all_labels = torch.cat([lab for _, lab in parts])
        result.class_ap = average_precision_per_class(all_scores, all_labels)
        result.class_positives = all_labels.sum(0)
        present = ~result.class_ap.isnan()
        metrics["mAP"] = float(result.class_ap[present].mean()) if present.any() else float("nan")
        metrics["map_classes"] = int(present.sum())
    return result


def average_precision_per_class(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Average precision of each column: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds
    in decreasing order (tied scores form one threshold), as scikit-learn's ``average_precision_score``
    defines it; NaN where a column has no positive. ``scores`` (N, C) float, ``labels`` (N, C) bool."""
    n, c = scores.shape
    out = torch.full((c,), float("nan"), dtype=torch.float64)
    for lo in range(0, c, _AP_CHUNK):
        s, order = scores[:, lo:lo + _AP_CHUNK].double().sort(dim=0, descending=True, stable=True)
        y = labels[:, lo:lo + _AP_CHUNK].gather(0, order).double()
        tp, seen = y.cumsum(0), torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
        last = torch.ones_like(s, dtype=torch.bool)  # the last row of each group of tied scores
        last[:-1] = s[:-1] != s[1:]
        tp_at_last = torch.where(last, tp, torch.zeros_like(tp))
        before = torch.cat([torch.zeros_like(tp[:1]), tp_at_last.cummax(0).values[:-1]])  # tp at the previous threshold
        gain = torch.where(last, (tp - before) * tp / seen, torch.zeros_like(tp)).sum(0)
        positives = y.sum(0)
        out[lo:lo + _AP_CHUNK] = torch.where(positives > 0, gain / positives.clamp_min(1), float("nan"))
    return out
