"""Growing a base network into a family, the way the paper grows EfficientNetV2-S into M and L (§3.3).

EfficientNet's compound scaling: with a coefficient ``phi``, depth grows by ``alpha^phi``, width by
``beta^phi`` and image size by ``gamma^phi``. The defaults alpha=1.2, beta=1.1, gamma=1.15 are
EfficientNet's (Tan & Le 2019, §3.3: a grid search on B0 under ``alpha * beta^2 * gamma^2 ~= 2``, so
FLOPs roughly double per unit of phi). Image sizes are rounded to a multiple of ``round_to`` (4: every
official size is one). The V2 paper changes two things:

- the largest image size is capped (at 480 for inference; ``max_size``), since bigger images cost
  memory and speed for little accuracy; the train size keeps the base's train/eval ratio under the cap;
- more layers go to the later stages (it names stages 5 and 6). It gives no numbers, so this is
  generalised to: the last ``late_stages`` stages grow by an extra ``late_depth^phi``. The default 1.1 is
  our choice; for comparison, the official S -> M tables (model/config.py) grow stages 5-6 by ~1.4x in
  layers against ~1.3x for stages 1-4.

Members are explicit tables (width = depth = 1.0), so each is a plain config file. Dropout grows by
``dropout_step`` per unit of phi (S/M/L use 0.2/0.3/0.4), capped at 0.5 (EfficientNet-B7's).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from ..config import ModelConfig, round_channels
from ..efficientnetv2 import EfficientNetV2
from ..flops import count_flops, count_parameters


@dataclass(frozen=True)
class Compound:
    """Scaling coefficients: per unit of phi, depth x alpha, width x beta, image size x gamma, and the last
    ``late_stages`` stages' depth x ``late_depth`` on top."""

    alpha: float = 1.2
    beta: float = 1.1
    gamma: float = 1.15
    late_depth: float = 1.1
    late_stages: int = 2


@dataclass(frozen=True)
class Member:
    """One member of a family with its cost: trainable parameters and FLOPs (multiply-adds) at eval size."""

    phi: float
    config: ModelConfig
    params: int
    flops: int

    def info(self, coeffs: Compound, base: str) -> dict:
        """Provenance for the config file's ``info``."""
        return {"scaled_from": base, "phi": self.phi, **asdict(coeffs), "params": self.params,
                "flops": self.flops}


def _round_size(size: float, multiple: int) -> int:
    return max(multiple, int(size / multiple + 0.5) * multiple)


def scale_config(base: ModelConfig, phi: float, *, coeffs: Compound = Compound(), max_size: int = 480,
                 round_to: int = 4, dropout_step: float = 0.1, name: str | None = None) -> ModelConfig:
    """``base`` grown by compound coefficient ``phi`` (0 gives the base's own table), named ``<base>-x<phi>``."""
    if phi < 0:
        raise ValueError(f"phi must be >= 0, got {phi}")
    depth, width, res = coeffs.alpha ** phi, coeffs.beta ** phi, coeffs.gamma ** phi
    stages = base.scaled_stages()
    first_late = len(stages) - coeffs.late_stages
    grown = tuple(
        replace(s, repeats=math.ceil(s.repeats * depth * (coeffs.late_depth ** phi if i >= first_late else 1.0)),
                in_ch=round_channels(s.in_ch, width), out_ch=round_channels(s.out_ch, width))
        for i, s in enumerate(stages)
    )
    eval_size = min(max_size, _round_size(base.eval_size * res, round_to))
    train_cap = _round_size(max_size * base.train_size / base.eval_size, round_to)
    train_size = min(train_cap, _round_size(base.train_size * res, round_to), eval_size)
    return ModelConfig(name or f"{base.name}-x{phi:g}", grown, train_size, eval_size,
                       round(max(base.dropout, min(0.5, base.dropout + dropout_step * phi)), 4),
                       head_ch=round_channels(base.head_channels, width), stem_stride=base.stem_stride,
                       official=False)


def measure(cfg: ModelConfig, num_classes: int = 1000, image_size: int | None = None) -> tuple[int, int]:
    """(parameters, FLOPs at ``image_size`` or the eval size) of ``cfg``, counted on the meta device."""
    with torch.device("meta"):
        model = EfficientNetV2(cfg, num_classes)
    return count_parameters(model), count_flops(model, image_size or cfg.eval_size)


def scale_family(base: ModelConfig, phis: tuple[float, ...] = (1, 2, 3), *, num_classes: int = 1000,
                 **kw) -> list[Member]:
    """The members ``<base>-x1, -x2, ...`` with their parameters and FLOPs; ``kw`` goes to scale_config."""
    members = []
    for phi in phis:
        cfg = scale_config(base, phi, **kw)
        members.append(Member(phi, cfg, *measure(cfg, num_classes)))
    return members
