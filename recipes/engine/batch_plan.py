"""Stage batches from memory (``batch_plan=memory``): each stage trains at the largest batch that fits.

Large images are slow because they force small batches (paper §3.2, Table 2); progressive learning
trains its early stages at small images, where a much larger batch fits. :func:`plan_stage_batches`
gives every stage the largest per-device batch whose counted step memory (:mod:`effnetv2.model.memory`,
margin included) fits the budget, a multiple of 8, capped by ``max_batch`` and by the data; the global
batch is that times the ranks, the same on every rank (DDP keeps equal steps).

What stays exact (:func:`~effnetv2.recipes.engine.plan.stage_spans`): a stage covers its share of
epochs at its own batch, starts reading where the previous stage stopped (epoch, sample), and a resume
uses the batches its checkpoint was trained with.

The LR follows the batch by the linear rule (Goyal et al. 2017, "Accurate, large minibatch SGD"), the
rule ``lr_per_256`` states: a stage at global batch ``B`` trains at ``lr_per_256 * B / 256`` times the
schedule's factor. The schedule itself (warm-up, decay) keeps the configured batch's clock: a stage's
steps are mapped linearly onto the reference steps its epochs span, so "decay every 2.4 epochs" stays
epochs. When the batch rises at a stage switch (its LR with it), the LR ramps linearly from the previous
stage's over the stage's first ``lr_ramp_epochs``; when it falls, it switches at once.
"""

from __future__ import annotations

import dataclasses

import torch

from effnetv2.model.config import ModelConfig
from effnetv2.model.memory import StepMemory, parse_budget, plan_batches, step_memory

from .plan import Span, Stage
from .schedule import LRSchedule

MULTIPLE = 8  # per-device batches are multiples of this


def plan_stage_batches(stages: tuple[Stage, ...], *, model: str | ModelConfig, num_classes: int, budget: int,
                       amp: torch.dtype | None, channels_last: bool = True, tf_padding: bool = False,
                       world_size: int = 1, max_batch: int = 0, num_samples: int | None = None,
                       margin: float = 0.10) -> tuple[tuple[Stage, ...], tuple[StepMemory, ...]]:
    """``stages`` with each ``batch_size`` the largest global batch that fits ``budget`` bytes per device,
    and the memory model of each stage. ``max_batch`` caps the global batch (0: no cap); the data caps the
    per-device batch at ``num_samples // world_size``. Raises ``ValueError`` naming the stage that does
    not fit a batch of 8."""
    cap = max_batch // world_size if max_batch else 1 << 40
    if cap < MULTIPLE:
        raise ValueError(f"max_batch {max_batch} over {world_size} ranks leaves {cap} per rank; per-rank "
                         f"batches are multiples of {MULTIPLE}")
    memory = tuple(step_memory(model, num_classes, s.image_size, amp=amp, channels_last=channels_last,
                               tf_padding=tf_padding, ddp=world_size > 1, margin=margin) for s in stages)
    limit = None if num_samples is None else num_samples // world_size
    local = plan_batches(memory, budget, max_batch=cap, multiple=MULTIPLE, data_limit=limit)
    return tuple(dataclasses.replace(s, batch_size=b * world_size) for s, b in zip(stages, local)), memory


def run_budget(memory: str, device: torch.device, *, option: str = "memory") -> int:
    """The bytes of ``memory`` ("80GiB", or "auto": what ``device`` has free); an error names ``option``."""
    try:
        return parse_budget(memory, device)
    except ValueError as e:
        raise ValueError(f"{option}={memory}: {e}") from None


def lr_rule(lr_per_256: float, ref_batch: int, ref_steps_per_epoch: int, ramp_epochs: float) -> str:
    """The LR rule of a planned run, in one line (printed under the plan table)."""
    return (f"LR: linear in the batch (Goyal et al. 2017), {lr_per_256:g} x batch / 256 (the peak lr column); "
            f"warm-up and decay keep the epochs of batch {ref_batch} ({ref_steps_per_epoch} steps/epoch); a stage "
            f"whose batch rises ramps from the previous stage's LR over {ramp_epochs:g} epoch(s), one whose "
            f"batch falls switches at once")


class StagedLR:
    """The run's :class:`LRSchedule` on the configured batch's clock, scaled by each stage's batch.

    ``lr(step) = schedule(ref) * scale`` with ``ref = ref_first + (step - first) * rate`` (the stage's
    steps mapped onto its reference steps) and ``scale`` = stage batch / configured batch, ramped from the
    previous stage's scale when it rises. Everything per stage is a device scalar that
    :meth:`set_stage` updates in place at the stage switch, so a captured CUDA graph reads the new
    values and the step never syncs.
    """

    def __init__(self, schedule: LRSchedule, ref_batch: int, device: torch.device) -> None:
        self.base, self.ref_batch = schedule, ref_batch
        zero = torch.zeros((), dtype=torch.float32, device=device)
        self.first, self.ref_first, self.rate = zero.clone(), zero.clone(), zero + 1
        self.scale_from, self.scale, self.ramp = zero + 1, zero + 1, zero.clone()

    def set_stage(self, span: Span, previous: Span | None, ramp_epochs: float) -> None:
        """Point the schedule at ``span`` (called at the stage switch, outside any captured graph)."""
        scale = span.batch / self.ref_batch
        scale_from = previous.batch / self.ref_batch if previous is not None else scale
        ramp = int(ramp_epochs * span.steps_per_epoch) if scale_from < scale else 0
        rate = (span.ref_end - span.ref_first) / max(span.end - span.first, 1)
        for t, v in ((self.first, span.first), (self.ref_first, span.ref_first), (self.rate, rate),
                     (self.scale_from, min(scale_from, scale)), (self.scale, scale), (self.ramp, ramp)):
            t.fill_(v)

    def __call__(self, step: torch.Tensor) -> torch.Tensor:
        j = step.to(torch.float32) - self.first  # steps into the stage
        lr = self.base(self.ref_first + j * self.rate)
        weight = torch.clamp((j + 1) / self.ramp, max=1.0)  # no ramp: (j + 1) / 0 = inf -> 1
        return lr * torch.lerp(self.scale_from, self.scale, weight)

    def at(self, step: int) -> float:
        """The LR at ``step`` of the current stage, on the host (logs and tests)."""
        return float(self(torch.tensor(step, dtype=torch.int64, device=self.first.device)))
