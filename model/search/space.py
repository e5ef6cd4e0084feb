"""The search space of paper §3.3: stage-based, factorised around a backbone whose channels and strides are kept.

Per stage the search picks an operator (MBConv or Fused-MBConv), a kernel (3x3 or 5x5), an expansion
ratio (1, 4 or 6), a number of layers, and SE on or off (MBConv only, ratio 0.25 of the block input as in
the official models). The paper's space also searches the number of layers without giving a range; here
it is ``max(1, r - 2) .. r + 2`` around the backbone's repeats ``r`` (``layer_delta``), so no stage is
ever dropped: the backbone's strides, hence the output resolution, stay as they are.

Every choice is one the builder accepts: a Fused-MBConv with expansion 1 is a single kxk conv that may
change stride and channels, an MBConv with expansion 1 is a depthwise conv on the input channels, and SE
only exists in MBConv (StageSpec rejects anything else).

Sampling is reproducible and order-free: candidate ``i`` of seed ``s`` is drawn from its own generator
seeded with ``(s, i)``, so asking for more samples later extends the same list, and a resumed search
re-derives the same candidates.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, replace
from typing import Literal

from ..config import ModelConfig, StageSpec
from ..config_file import get_config

OPS: tuple[str, ...] = ("fused", "mbconv")
KERNELS: tuple[int, ...] = (3, 5)
EXPANDS: tuple[int, ...] = (1, 4, 6)
SE_RATIO = 0.25
DEFAULT_BACKBONE = "efficientnetv2-demo"


@dataclass(frozen=True)
class StageChoice:
    """What the search decides for one stage (channels and stride come from the backbone)."""

    block: Literal["fused", "mbconv"]
    kernel: int
    expand: int
    layers: int
    se: bool = False


def operator_name(spec: StageSpec) -> str:
    """One stage in the notation of the paper's Table 4, e.g. ``MBConv6 k3x3 SE0.25``."""
    op = "Fused-MBConv" if spec.block == "fused" else "MBConv"
    se = f" SE{spec.se:g}" if spec.se else ""
    return f"{op}{spec.expand} k{spec.kernel}x{spec.kernel}{se}"


def describe(cfg: ModelConfig) -> str:
    """Any network's stages on one line in the notation of the paper's Table 4 (see Candidate.describe)."""
    return " | ".join(f"{operator_name(s)} x{s.repeats}" for s in cfg.scaled_stages())


def stage_table(cfg: ModelConfig) -> str:
    """The resolved stage table of ``cfg`` as the paper prints it (Stage, Operator, Stride, #Channels, #Layers)."""
    rows = [f"{'stage':>5}  {'operator':<24}{'stride':>6}  {'channels':>8}  {'layers':>6}",
            f"{0:>5}  {'Conv3x3':<24}{cfg.stem_stride:>6}  {cfg.scaled_stages()[0].in_ch:>8}  {1:>6}"]
    for i, s in enumerate(cfg.scaled_stages(), 1):
        rows.append(f"{i:>5}  {operator_name(s):<24}{s.stride:>6}  {s.out_ch:>8}  {s.repeats:>6}")
    rows.append(f"{len(cfg.stages) + 1:>5}  {'Conv1x1 & Pooling & FC':<24}{'-':>6}  {cfg.head_channels:>8}  {1:>6}")
    return "\n".join(rows)


def architecture_id(cfg: ModelConfig) -> str:
    """A short stable hash of the network ``cfg`` builds (resolved stage table, head, stem), not of its name
    or training defaults: the same architecture has the same id whichever way it was written down."""
    arch = [[asdict(s) for s in cfg.scaled_stages()], cfg.head_channels, cfg.stem_stride]
    return hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Candidate:
    """One point of the space: a choice per backbone stage. Frozen and hashable; ``to_config`` builds it."""

    backbone: ModelConfig
    choices: tuple[StageChoice, ...]

    def stages(self) -> tuple[StageSpec, ...]:
        base = self.backbone.scaled_stages()
        return tuple(
            replace(b, block=c.block, repeats=c.layers, kernel=c.kernel, expand=c.expand,
                    se=SE_RATIO if c.block == "mbconv" and c.se else 0.0)
            for b, c in zip(base, self.choices, strict=True)
        )

    @property
    def id(self) -> str:
        return architecture_id(self.to_config())

    def to_config(self, name: str | None = None) -> ModelConfig:
        """The candidate as an explicit table (width = depth = 1.0) with the backbone's head, stem, sizes
        and dropout; named ``<backbone>-search-<id>`` unless ``name`` is given."""
        b = self.backbone
        cfg = ModelConfig(name or "search-candidate", self.stages(), b.train_size, b.eval_size, b.dropout,
                          head_ch=b.head_channels, stem_stride=b.stem_stride, official=False)
        return cfg if name else replace(cfg, name=f"{b.name}-search-{architecture_id(cfg)}")

    def describe(self) -> str:
        """One line in the notation of the paper's Table 4: ``Fused-MBConv1 k3x3 x2 | MBConv4 k3x3 SE0.25 x4``."""
        return describe(self.to_config())

    def to_dict(self) -> dict:
        """The choices, JSON-ready (for a results file line); ``SearchSpace.from_dict`` reads them back."""
        return {"backbone": self.backbone.name, "stages": [asdict(c) for c in self.choices]}


@dataclass(frozen=True)
class SearchSpace:
    """The factorised space around ``backbone`` (a ModelConfig; see :meth:`around` for a name or file)."""

    backbone: ModelConfig
    ops: tuple[str, ...] = OPS
    kernels: tuple[int, ...] = KERNELS
    expands: tuple[int, ...] = EXPANDS
    layer_delta: int = 2

    @classmethod
    def around(cls, backbone: str | ModelConfig = DEFAULT_BACKBONE, **kw) -> SearchSpace:
        """The space around a registered model, a model config file, or a ModelConfig."""
        return cls(get_config(backbone), **kw)

    def layer_range(self, stage: int) -> range:
        r = self.backbone.scaled_stages()[stage].repeats
        return range(max(1, r - self.layer_delta), r + self.layer_delta + 1)

    def size(self) -> int:
        """Number of distinct architectures in the space (SE counts only for MBConv)."""
        n = 1
        per_op = len(self.kernels) * len(self.expands)
        for i in range(len(self.backbone.stages)):
            ops = sum(2 if op == "mbconv" else 1 for op in self.ops)
            n *= ops * per_op * len(self.layer_range(i))
        return n

    def sample(self, rng: random.Random) -> Candidate:
        """One candidate, uniform per stage over operator, kernel, expansion, layers and SE (MBConv)."""
        choices = []
        for i in range(len(self.backbone.stages)):
            block = rng.choice(self.ops)
            kernel, expand = rng.choice(self.kernels), rng.choice(self.expands)
            layers = rng.choice(self.layer_range(i))
            se = block == "mbconv" and rng.random() < 0.5
            choices.append(StageChoice(block, kernel, expand, layers, se))  # type: ignore[arg-type]
        return Candidate(self.backbone, tuple(choices))

    def samples(self, n: int, seed: int = 0) -> list[Candidate]:
        """Candidates ``0 .. n-1`` of ``seed``; candidate i depends only on (seed, i)."""
        return [self.sample(random.Random(f"effnetv2-search:{seed}:{i}")) for i in range(n)]

    def contains(self, c: Candidate) -> bool:
        """Whether ``c`` is a point of this space (same backbone, every choice allowed)."""
        if c.backbone != self.backbone or len(c.choices) != len(self.backbone.stages):
            return False
        return all(ch.block in self.ops and ch.kernel in self.kernels and ch.expand in self.expands
                   and ch.layers in self.layer_range(i) and (ch.block == "mbconv" or not ch.se)
                   for i, ch in enumerate(c.choices))

    def backbone_candidate(self) -> Candidate | None:
        """The backbone itself as a point of the space, or None if its table is outside it (say a 7x7
        kernel or an SE ratio other than 0.25)."""
        choices = tuple(StageChoice(s.block, s.kernel, s.expand, s.repeats, s.se > 0)  # type: ignore[arg-type]
                        for s in self.backbone.scaled_stages())
        c = Candidate(self.backbone, choices)
        same = c.stages() == self.backbone.scaled_stages()
        return c if same and self.contains(c) else None

    def from_dict(self, d: dict) -> Candidate:
        """Read back ``Candidate.to_dict``; raises ValueError if it is not a point of this space."""
        try:
            c = Candidate(self.backbone, tuple(StageChoice(**s) for s in d["stages"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a candidate record: {e}") from None
        if not self.contains(c):
            raise ValueError(f"candidate {c.describe()} is not in the space around {self.backbone.name}")
        return c
