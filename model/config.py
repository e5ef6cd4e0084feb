"""Stage tables of the EfficientNetV2 family, as data that reads like Table 4 of the paper.

Each row is one stage: ``F(r, k, s, e, c_in, c_out)`` is a Fused-MBConv stage and
``M(r, k, s, e, c_in, c_out, se)`` an MBConv stage (r repeats, k kernel, s stride of the first block,
e expansion, se squeeze ratio of the block *input* channels). The rows are the official release's
(google/automl efficientnetv2), which the current paper text and timm's ``tf_efficientnetv2_*`` agree with;
B0-B3 scale the base table by width/depth multipliers, S/M/L/XL have their own tables at 1.0/1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class StageSpec:
    """One row of a stage table."""

    block: Literal["fused", "mbconv"]
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int
    se: float = 0.0

    def __post_init__(self) -> None:
        """Reject what the builder cannot build (or would build wrongly), naming the field."""
        if self.block not in ("fused", "mbconv"):
            raise ValueError(f"block must be 'fused' or 'mbconv', got {self.block!r}")
        for field in ("repeats", "kernel", "stride", "expand", "in_ch", "out_ch"):
            _check_positive_int(field, getattr(self, field))
        if self.kernel % 2 == 0:  # the builder pads k // 2: an even kernel would shift the feature map
            raise ValueError(f"kernel must be odd, got {self.kernel}")
        if not _is_number(self.se) or not 0.0 <= self.se <= 1.0:
            raise ValueError(f"se must be a number in [0, 1], got {self.se!r}")
        if self.block == "fused" and self.se != 0.0:  # the builder has no SE in a fused block
            raise ValueError(f"a fused block has no squeeze-excitation: se must be 0, got {self.se}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_positive_int(field: str, value: object, owner: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner + ': ' if owner else ''}{field} must be a positive int, got {value!r}")


def F(r: int, k: int, s: int, e: int, c_in: int, c_out: int) -> StageSpec:  # noqa: N802 (table notation)
    """A Fused-MBConv stage (never has squeeze-excitation)."""
    return StageSpec("fused", r, k, s, e, c_in, c_out)


def M(r: int, k: int, s: int, e: int, c_in: int, c_out: int, se: float = 0.25) -> StageSpec:  # noqa: N802
    """An MBConv stage with squeeze-excitation (ratio of the block's input channels)."""
    return StageSpec("mbconv", r, k, s, e, c_in, c_out, se)


def round_channels(c: float, width: float) -> int:
    """Official channel rounding: nearest multiple of 8, at least 8 (no "stay above 90%" guard)."""
    return max(8, int(c * width + 4) // 8 * 8)


@dataclass(frozen=True)
class ModelConfig:
    """A whole network: stage table, multipliers, stem/head, and the training defaults that go with it.

    ``train_size``/``eval_size`` are the official image sizes and ``dropout`` the head dropout; the
    recipes read them. ``official`` is False for variants that no paper or release defines.
    """

    name: str
    stages: tuple[StageSpec, ...]
    train_size: int
    eval_size: int
    dropout: float
    width: float = 1.0
    depth: float = 1.0
    head_ch: int = 1280
    stem_stride: int = 2
    official: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.stages, tuple) or not self.stages or \
                not all(isinstance(s, StageSpec) for s in self.stages):
            raise ValueError(f"{self.name}: stages must be a non-empty tuple of StageSpec")
        for field in ("train_size", "eval_size", "head_ch", "stem_stride"):
            _check_positive_int(field, getattr(self, field), self.name)
        for field in ("width", "depth"):
            value = getattr(self, field)
            if not _is_number(value) or not 0.0 < value < math.inf:
                raise ValueError(f"{self.name}: {field} must be a positive number, got {value!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.name}: dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.official, bool):
            raise ValueError(f"{self.name}: official must be true or false, got {self.official!r}")
        for i, (a, b) in enumerate(zip(self.stages, self.stages[1:])):
            if a.out_ch != b.in_ch:
                raise ValueError(f"{self.name}: stages do not chain: stages[{i}].out_ch = {a.out_ch} but "
                                 f"stages[{i + 1}].in_ch = {b.in_ch}")

    def scaled_stages(self) -> tuple[StageSpec, ...]:
        """The table after width (channels) and depth (repeats) scaling."""
        return tuple(
            replace(s, repeats=math.ceil(self.depth * s.repeats),
                    in_ch=round_channels(s.in_ch, self.width), out_ch=round_channels(s.out_ch, self.width))
            for s in self.stages
        )

    @property
    def head_channels(self) -> int:
        """Width of the 1x1 head conv: 1280 rounded by the width multiplier (B2 1408, B3 1536)."""
        return round_channels(self.head_ch, self.width)

    @property
    def num_blocks(self) -> int:
        return sum(s.repeats for s in self.scaled_stages())


_BASE = (  # B0-B3 before scaling
    F(1, 3, 1, 1, 32, 16),
    F(2, 3, 2, 4, 16, 32),
    F(2, 3, 2, 4, 32, 48),
    M(3, 3, 2, 4, 48, 96),
    M(5, 3, 1, 6, 96, 112),
    M(8, 3, 2, 6, 112, 192),
)

_S = (
    F(2, 3, 1, 1, 24, 24),
    F(4, 3, 2, 4, 24, 48),
    F(4, 3, 2, 4, 48, 64),
    M(6, 3, 2, 4, 64, 128),
    M(9, 3, 1, 6, 128, 160),
    M(15, 3, 2, 6, 160, 256),
)

_M = (
    F(3, 3, 1, 1, 24, 24),
    F(5, 3, 2, 4, 24, 48),
    F(5, 3, 2, 4, 48, 80),
    M(7, 3, 2, 4, 80, 160),
    M(14, 3, 1, 6, 160, 176),
    M(18, 3, 2, 6, 176, 304),
    M(5, 3, 1, 6, 304, 512),
)

_L = (
    F(4, 3, 1, 1, 32, 32),
    F(7, 3, 2, 4, 32, 64),
    F(7, 3, 2, 4, 64, 96),
    M(10, 3, 2, 4, 96, 192),
    M(19, 3, 1, 6, 192, 224),
    M(25, 3, 2, 6, 224, 384),
    M(7, 3, 1, 6, 384, 640),
)

_XL = (
    F(4, 3, 1, 1, 32, 32),
    F(8, 3, 2, 4, 32, 64),
    F(8, 3, 2, 4, 64, 96),
    M(16, 3, 2, 4, 96, 192),
    M(24, 3, 1, 6, 192, 256),
    M(32, 3, 2, 6, 256, 512),
    M(8, 3, 1, 6, 512, 640),
)

# NOT an official model: the demo's network for Fashion-MNIST at its native 28 px, found by this
# project's training-aware search (`effnetv2 search`, paper §3.3; candidate c012 of the run in
# bench/RESULTS.md) around a hand-made backbone of the same widths and strides (full-resolution stem,
# 11 blocks with SE, 1.17M parameters). The found one has 6 blocks and no SE, 0.46M parameters, and on
# 2 CPU cores trains 1.7x faster and more accurately (7 epochs: 92.70% vs 91.76%).
_DEMO = (
    F(1, 3, 2, 6, 16, 16),
    F(1, 5, 2, 4, 16, 32),
    F(1, 3, 2, 6, 32, 48),
    M(2, 3, 2, 6, 48, 96, se=0.0),
    F(1, 3, 1, 1, 96, 128),
)

# NOT an official model: the hand-made network the demo's search started from (its backbone; kept so
# that `effnetv2 search --backbone efficientnetv2-demo-base` reruns that search): same widths and
# strides, 11 blocks, SE in the MBConv stages, 1.17M parameters; 91.76% in the 7-epoch demo recipe.
_DEMO_BASE = (
    F(1, 3, 2, 1, 16, 16),
    F(2, 3, 2, 4, 16, 32),
    F(2, 3, 2, 4, 32, 48),
    M(3, 3, 2, 4, 48, 96),
    M(3, 3, 1, 6, 96, 128),
)

CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        ModelConfig("efficientnetv2-b0", _BASE, 192, 224, 0.2),
        ModelConfig("efficientnetv2-b1", _BASE, 192, 240, 0.2, depth=1.1),
        ModelConfig("efficientnetv2-b2", _BASE, 208, 260, 0.3, width=1.1, depth=1.2),
        ModelConfig("efficientnetv2-b3", _BASE, 240, 300, 0.3, width=1.2, depth=1.4),
        ModelConfig("efficientnetv2-s", _S, 300, 384, 0.2),
        ModelConfig("efficientnetv2-m", _M, 384, 480, 0.3),
        ModelConfig("efficientnetv2-l", _L, 384, 480, 0.4),
        ModelConfig("efficientnetv2-xl", _XL, 384, 512, 0.4),
        ModelConfig("efficientnetv2-demo", _DEMO, 28, 28, 0.1, head_ch=512, stem_stride=1, official=False),
        ModelConfig("efficientnetv2-demo-base", _DEMO_BASE, 28, 28, 0.1, head_ch=512, stem_stride=1, official=False),
    )
}
