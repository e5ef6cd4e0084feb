"""Progressive learning with adaptive regularisation (EfficientNetV2, Algorithm 1).

Training is split into stages; each stage trains at one image size with regularisation matched to
that size (small images, weak augmentation; large images, strong), inheriting all weights. The
planner only computes the frozen :class:`Stage` records; the trainer turns them into loaders and
captured steps.

Three presets, because the paper and the released code disagree and the project offers both:

``paper``
    Table 6: stage ``i`` of ``M`` uses ``lo + (hi - lo) * i / (M - 1)`` for the image size and every
    regulariser, so the first stage sits at the minimum and the last at the maximum; dropout is
    scheduled too.
``official``
    The released code: size ``int(128 + (S_e - 128) * (i + 1) / M)`` (never 128; S: 171, 214, 257,
    300), RandAugment magnitude ``linspace(5, m, M)`` (floats), mixup = cutmix = ``linspace(0, a, M)``,
    dropout fixed at the model's value.
``random-resize``
    The Table 13 ablation in Mix&Match style: every ``resize_every`` epochs a size is drawn uniformly
    from the ``paper`` levels, with the regularisation of that level.

B0–B3 are trained with AutoAugment in the released code and Table 6 has no row for them; this project
has RandAugment only, so their presets hold the magnitude at 5 (the weak end of the V2-S ramp) with
no mixup. XL has no Table 6 row either: it uses L's regularisation and its own train size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PRESETS = ("official", "paper", "random-resize")
BATCH_PLANS = ("fixed", "memory")  # every stage at the configured batch | the largest that fits (batch_plan.py)


@dataclass(frozen=True)
class Stage:
    """One stage of a progressive plan: what the loader, the model and the step need to know."""

    index: int
    image_size: int
    randaug_magnitude: float
    mixup_alpha: float
    cutmix_alpha: float
    dropout: float
    epochs: float
    batch_size: int


@dataclass(frozen=True)
class Regimen:
    """One model's progressive-learning ends beyond its config: the official final RandAugment magnitude
    and mixup/cutmix alpha, and the paper's Table 6 ranges. The train size and dropout of the official
    preset are the model config's own (:class:`effnetv2.model.ModelConfig`)."""

    randaug: float  # official final RandAugment magnitude
    mix: float  # official final mixup alpha = cutmix alpha
    paper_size: tuple[int, int]
    paper_randaug: tuple[float, float]
    paper_mixup: tuple[float, float]
    paper_dropout: tuple[float, float]


_S_E_MIN = 128  # the official code's first size base (``ibase``) and the paper's S_0
_RANDAUG_MIN = 5.0  # the official code's first RandAugment magnitude

REGIMENS: dict[str, Regimen] = {
    "s": Regimen(10.0, 0.0, (128, 300), (5.0, 15.0), (0.0, 0.0), (0.1, 0.3)),
    "m": Regimen(15.0, 0.2, (128, 380), (5.0, 20.0), (0.0, 0.2), (0.1, 0.4)),
    "l": Regimen(20.0, 0.5, (128, 380), (5.0, 25.0), (0.0, 0.4), (0.1, 0.5)),
    "xl": Regimen(20.0, 0.5, (128, 384), (5.0, 25.0), (0.0, 0.4), (0.1, 0.5)),
    "b0": Regimen(5.0, 0.0, (128, 192), (5.0, 5.0), (0.0, 0.0), (0.2, 0.2)),
    "b1": Regimen(5.0, 0.0, (128, 192), (5.0, 5.0), (0.0, 0.0), (0.2, 0.2)),
    "b2": Regimen(5.0, 0.0, (128, 208), (5.0, 5.0), (0.0, 0.0), (0.3, 0.3)),
    "b3": Regimen(5.0, 0.0, (128, 240), (5.0, 5.0), (0.0, 0.0), (0.3, 0.3)),
}


def regimen(model: str) -> Regimen:
    """The regimen of ``model``, given as ``"s"`` or ``"efficientnetv2-s"``."""
    key = str(model).lower().removeprefix("efficientnetv2-")
    if key not in REGIMENS:
        raise ValueError(f"no progressive-learning preset for model {model!r}; known: {sorted(REGIMENS)}")
    return REGIMENS[key]


def _linspace(lo: float, hi: float, n: int) -> list[float]:
    return [float(v) for v in np.linspace(lo, hi, n)]


def _round(size: float, multiple: int) -> int:
    """Nearest multiple of ``multiple`` (halves up), never below one multiple."""
    return max(multiple, int(math.floor(size / multiple + 0.5)) * multiple)


def progressive(*, size: tuple[int, int], randaug: tuple[float, float], mixup: tuple[float, float],
                cutmix: tuple[float, float], dropout: tuple[float, float], num_stages: int, epochs: float,
                batch_size: int, size_rule: str = "paper", round_to: int = 1) -> tuple[Stage, ...]:
    """Algorithm 1 from explicit ends.

    Regularisers always ramp as ``linspace(lo, hi, M)``. ``size_rule="paper"`` ramps the size the
    same way (rounded to the nearest integer); ``"official"`` uses ``int(lo + (hi - lo)(i + 1)/M)``.
    ``round_to`` then moves each size to the nearest multiple (8/16/32 suit strided convolutions).
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if size_rule not in ("paper", "official"):
        raise ValueError(f"size_rule must be 'paper' or 'official', got {size_rule!r}")
    m = num_stages
    if size_rule == "paper":
        sizes = [float(s) for s in np.linspace(size[0], size[1], m)] if m > 1 else [float(size[1])]
        sizes = [math.floor(s + 0.5) for s in sizes]
    else:
        sizes = [int(size[0] + (size[1] - size[0]) * (i + 1) / m) for i in range(m)]
    ramps = [_linspace(*r, m) if m > 1 else [float(r[1])] for r in (randaug, mixup, cutmix, dropout)]
    return tuple(
        Stage(i, _round(sizes[i], round_to), ramps[0][i], ramps[1][i], ramps[2][i], ramps[3][i],
              epochs / m, batch_size)
        for i in range(m)
    )


def make_plan(model: str, preset: str = "official", *, epochs: float, batch_size: int, num_stages: int = 4,
              size: tuple[int, int] | None = None, randaug: tuple[float, float] | None = None,
              mixup: tuple[float, float] | None = None, cutmix: tuple[float, float] | None = None,
              dropout: tuple[float, float] | None = None, round_to: int = 1, resize_every: float = 10.0,
              seed: int = 0) -> tuple[Stage, ...]:
    """The stages for ``model`` under ``preset``; any ``(lo, hi)`` given replaces the preset's ends.

    A model without a preset row (``efficientnetv2-demo``) is planned when all five ranges are given.
    """
    given = dict(size=size, randaug=randaug, mixup=mixup, cutmix=cutmix, dropout=dropout)
    if preset not in PRESETS:
        raise ValueError(f"unknown plan preset {preset!r}; choose one of {PRESETS}")
    if all(v is not None for v in given.values()):
        r, train_size, dropout = REGIMENS["s"], 1, 0.0  # every end is given: only the preset's rule matters
    else:
        try:
            r = regimen(model)
        except ValueError as e:
            raise ValueError(f"{e}; or give all of size, randaug, mixup, cutmix and dropout") from None
        from effnetv2.model import get_config

        c = get_config(f"efficientnetv2-{str(model).lower().removeprefix('efficientnetv2-')}")
        train_size, dropout = c.train_size, c.dropout
    if preset == "official":
        ends = dict(size=(_S_E_MIN, train_size), randaug=(_RANDAUG_MIN, r.randaug), mixup=(0.0, r.mix),
                    cutmix=(0.0, r.mix), dropout=(dropout, dropout))
        rule = "official"
    else:
        ends = dict(size=r.paper_size, randaug=r.paper_randaug, mixup=r.paper_mixup, cutmix=(0.0, 0.0),
                    dropout=r.paper_dropout)
        rule = "paper"
    ends.update({k: tuple(v) for k, v in given.items() if v is not None})
    levels = progressive(**ends, num_stages=num_stages, epochs=epochs, batch_size=batch_size,
                         size_rule=rule, round_to=round_to)
    if preset != "random-resize":
        return levels
    return random_resize(levels, epochs=epochs, every=resize_every, seed=seed)


def random_resize(levels: tuple[Stage, ...], *, epochs: float, every: float, seed: int) -> tuple[Stage, ...]:
    """Every ``every`` epochs draw one of ``levels`` uniformly (seeded); the last chunk may be shorter."""
    if every <= 0:
        raise ValueError(f"resize_every must be > 0 epochs, got {every}")
    rng = np.random.default_rng(seed)
    stages, done = [], 0.0
    while done < epochs - 1e-9:
        length = min(every, epochs - done)
        lv = levels[int(rng.integers(len(levels)))]
        stages.append(Stage(len(stages), lv.image_size, lv.randaug_magnitude, lv.mixup_alpha,
                            lv.cutmix_alpha, lv.dropout, length, lv.batch_size))
        done += length
    return tuple(stages)


def stage_bounds(stages: tuple[Stage, ...], total_steps: int) -> list[tuple[int, int]]:
    """``(first, end)`` global step of each stage: stage ``i`` ends at ``int(cum_epochs_i / E * N)``.

    For equal stages this is the released code's ``int((i + 1) / M * train_steps)``.
    """
    total_epochs = sum(s.epochs for s in stages)
    bounds, start, cum = [], 0, 0.0
    for s in stages:
        cum += s.epochs
        end = total_steps if s is stages[-1] else int(cum / total_epochs * total_steps + 1e-9)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class Span:
    """A stage in steps and samples: its global steps, its batch, and where its data starts.

    ``ref_first``/``ref_end`` are the same stretch on the clock of the configured batch (the LR
    schedule's steps); ``epoch``/``sample`` is every rank's position in :func:`epoch_order` (the
    loaders' sampler) at the stage's first step.
    """

    first: int
    end: int
    batch: int  # global
    local_batch: int  # per rank
    steps_per_epoch: int  # at this batch: the epoch's tail that does not fill a step is dropped
    epoch: int
    sample: int
    ref_first: int
    ref_end: int

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, sample)`` each rank reads at global ``step`` (``first <= step <= end``)."""
        return advance(self.epoch, self.sample, step - self.first, self.local_batch, self.steps_per_epoch)


def advance(epoch: int, sample: int, steps: int, batch: int, steps_per_epoch: int) -> tuple[int, int]:
    """The position after ``steps`` steps of ``batch`` samples (per rank) from ``(epoch, sample)``.

    An epoch at this batch holds ``steps_per_epoch * batch`` samples; what is left of it that does not
    fill a batch is skipped (as the loader drops it), so a position need not be a multiple of the batch
    (a stage that starts where a stage with another batch stopped).
    """
    left = max(0, (steps_per_epoch * batch - sample) // batch)  # whole batches left in this epoch
    if steps < left:
        return epoch, sample + steps * batch
    steps -= left
    return epoch + 1 + steps // steps_per_epoch, steps % steps_per_epoch * batch


def stage_spans(stages: tuple[Stage, ...], total_steps: int, *, num_samples: int, batch_size: int,
                world_size: int = 1) -> list[Span]:
    """Each stage in steps and samples, at its own ``Stage.batch_size`` (global).

    ``total_steps`` and :func:`stage_bounds` are counted at the configured ``batch_size`` (the reference
    clock); a stage at another batch covers the same share of epochs: its reference steps times
    ``steps_per_epoch(its batch) / steps_per_epoch(configured)``, rounded to the nearest step (at least
    one). It starts at the data position where the previous one stopped, so every rank reads each
    epoch's order once, in order, across batch changes. With every stage at the configured batch this
    is :func:`stage_bounds` and global step ``k`` reads batch ``k % steps_per_epoch`` of epoch
    ``k // steps_per_epoch``, as without a plan.
    """
    ref_spe = num_samples // batch_size
    if ref_spe < 1:
        raise ValueError(f"{num_samples} samples do not fill one batch of {batch_size}")
    spans, step, epoch, sample = [], 0, 0, 0
    for stage, (ref_first, ref_end) in zip(stages, stage_bounds(stages, total_steps)):
        if stage.batch_size % world_size:
            raise ValueError(f"stage {stage.index}: batch {stage.batch_size} is not divisible by "
                             f"{world_size} ranks")
        spe = num_samples // stage.batch_size
        if spe < 1:
            raise ValueError(f"stage {stage.index}: {num_samples} samples do not fill one batch of "
                             f"{stage.batch_size}")
        n = ref_end - ref_first
        if stage.batch_size != batch_size and n > 0:
            n = max(1, (2 * n * spe + ref_spe) // (2 * ref_spe))  # n * spe / ref_spe, halves up
        local = stage.batch_size // world_size
        spans.append(Span(step, step + n, stage.batch_size, local, spe, epoch, sample, ref_first, ref_end))
        step += n
        epoch, sample = advance(epoch, sample, n, local, spe)
    return spans


def format_plan(stages: tuple[Stage, ...], steps_per_epoch: int | None = None, *, spans: list[Span] | None = None,
                memory: list[str] | None = None, lr_per_256: float | None = None) -> str:
    """A fixed-width table of the plan (the output of ``effnetv2 plan``).

    ``steps_per_epoch`` (the configured batch's) adds the steps column; ``spans`` gives it for stages at
    their own batches; ``memory`` (one text per stage, e.g. the predicted bytes per device) and
    ``lr_per_256`` (the stage's peak LR, ``lr_per_256 * batch / 256``) add their columns.
    """
    head = f"{'stage':>5} {'size':>5} {'randaug':>8} {'mixup':>6} {'cutmix':>6} {'dropout':>7} {'epochs':>7} {'batch':>6}"
    bounds = [(sp.first, sp.end) for sp in spans] if spans else None
    if bounds is None and steps_per_epoch:
        bounds = stage_bounds(stages, int(sum(s.epochs for s in stages) * steps_per_epoch + 1e-9))
    head += (f" {'steps':>16}" if bounds else "") + (f" {'memory':>10}" if memory else "")
    head += f" {'peak lr':>8}" if lr_per_256 else ""
    lines = [head]
    for i, s in enumerate(stages):
        line = (f"{s.index:>5} {s.image_size:>5} {s.randaug_magnitude:>8.2f} {s.mixup_alpha:>6.2f} "
                f"{s.cutmix_alpha:>6.2f} {s.dropout:>7.2f} {s.epochs:>7.2f} {s.batch_size:>6}")
        if bounds:
            line += f" {bounds[i][0]:>7}-{bounds[i][1]:<8}"
        if memory:
            line += f" {memory[i]:>10}"
        if lr_per_256:
            line += f" {lr_per_256 * s.batch_size / 256:>8.4g}"
        lines.append(line.rstrip())
    return "\n".join(lines)
