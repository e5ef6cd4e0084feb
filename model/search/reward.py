"""The search reward of paper §3.3, ``A * S^w * P^v``, and the accuracy / step-time Pareto front.

``S`` is the training step time divided by the backbone's, ``P`` the parameter count divided by the
backbone's. The paper does not say which unit P is in; with a power law the unit only multiplies every
reward by the same constant (``(cP)^v = c^v P^v``), so the ranking is the same in any unit. Normalising P
as well as S fixes that constant so the backbone's reward is exactly its accuracy: every reward then
reads as an accuracy, and "better than the backbone" is ``reward > backbone accuracy``.

The exponents are the paper's (w = -0.07 from MnasNet, where it makes a 2x slower model worth about 5%
more accuracy: ``2^-0.07 = 0.953``; v = -0.05).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

W_STEP_TIME = -0.07
V_PARAMS = -0.05


def reward(accuracy: float, step_time: float, params: float, *, base_step_time: float, base_params: float,
           w: float = W_STEP_TIME, v: float = V_PARAMS) -> float:
    """``A * (step_time / base_step_time)^w * (params / base_params)^v``; ``accuracy`` is a fraction in [0, 1]."""
    if not (isinstance(accuracy, (int, float)) and 0.0 <= accuracy <= 1.0):
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {accuracy!r}")
    for name, x in (("step_time", step_time), ("params", params), ("base_step_time", base_step_time),
                    ("base_params", base_params)):
        if not (isinstance(x, (int, float)) and 0.0 < x < math.inf):
            raise ValueError(f"{name} must be a positive finite number, got {x!r}")
    return accuracy * (step_time / base_step_time) ** w * (params / base_params) ** v


def pareto_front(accuracy: Sequence[float], step_time: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (at least as accurate AND at least as fast, better in one),
    ordered by step time: the line to draw on an accuracy-vs-step-time chart."""
    if len(accuracy) != len(step_time):
        raise ValueError(f"{len(accuracy)} accuracies but {len(step_time)} step times")
    order = sorted(range(len(accuracy)), key=lambda i: (step_time[i], -accuracy[i]))
    front: list[int] = []
    best = -math.inf
    for i in order:  # fastest first: a point is on the front iff it beats every faster point's accuracy
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return front
