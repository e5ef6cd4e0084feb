"""The one timing harness every benchmark uses: warm-up excluded, several repetitions, median and spread.

A benchmark hands :func:`measure` one or more *steps*: callables that do one unit of work (one batch
from a loader, one training step) and return how many images it covered. Each step is warmed up
first (start-up, compilation, worker spawn and first-batch latency are excluded), then timed over
``reps`` repetitions of ``per_rep`` calls. With several steps the repetitions are interleaved
(A B A B ...), so that two things compared in one run see the same machine: drift or a noisy
neighbour then hits both sides instead of biasing the ratio.

This module imports only the standard library, so that peers can use it from another interpreter
(``--peer-python``) without the project's dependencies.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Timing:
    """Images per second of each timed repetition, and the warm-up it excluded."""

    rates: tuple[float, ...]
    warmup_s: float  # seconds spent in warm-up calls (includes start-up and compilation)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def low(self) -> float:
        return min(self.rates)

    @property
    def high(self) -> float:
        return max(self.rates)

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the repetitions disagree (0.05 = 5 %)."""
        return (self.high - self.low) / self.median if self.median > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "rates": list(self.rates), "median": self.median, "low": self.low,
                "high": self.high, "spread": self.spread}

    @classmethod
    def from_dict(cls, d: dict) -> Timing:
        return cls(tuple(float(r) for r in d["rates"]), float(d["warmup_s"]))


def measure(steps: dict[str, Callable[[], int]], *, warmup: int, reps: int, per_rep: int,
            sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time each step: ``warmup`` untimed calls, then ``reps`` interleaved repetitions of ``per_rep`` calls.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before each clock read, so that work queued
    on an accelerator is counted where it was issued.
    """
    if reps < 1 or per_rep < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1, per_rep >= 1 and warmup >= 0 (got {reps}, {per_rep}, {warmup})")
    sync = sync or (lambda: None)
    warm: dict[str, float] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        sync()
        warm[name] = time.perf_counter() - start
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            images = sum(step() for _ in range(per_rep))
            sync()
            rates[name].append(images / (time.perf_counter() - start))
    return {name: Timing(tuple(rates[name]), warm[name]) for name in steps}

