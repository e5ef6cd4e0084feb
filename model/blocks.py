"""Building blocks: conv-BN-SiLU, Fused-MBConv, MBConv, squeeze-excitation, stochastic depth.

Written for speed under eager and ``torch.compile`` alike: no host syncs (stochastic depth draws a
per-sample mask tensor on the device), no data-dependent Python branches (only shapes and module
attributes, which are static), in-place activations where autograd allows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis: output ``ceil(size / stride)``, the odd pixel at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TF "SAME" padding, needed to reproduce weights trained in TensorFlow.

    Only strided convs need it: for stride 1 and an odd kernel SAME is the symmetric ``k // 2``. With
    stride 2 on an even size TF pads 0 before and 1 after, where PyTorch's ``padding=1`` pads 1 and 1;
    the output size is the same but the sampling grid shifts by one pixel.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return self._conv_forward(x, self.weight, None)


@dataclass(frozen=True)
class LayerOptions:
    """Settings shared by every conv-BN layer of a model."""

    bn_eps: float = 1e-3
    bn_momentum: float = 0.1  # PyTorch convention: official TF decay 0.9 -> 0.1; the paper's 0.99 -> 0.01
    tf_padding: bool = False


class ConvBNAct(nn.Module):
    """kxk conv (no bias) -> BatchNorm -> optional SiLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, opts: LayerOptions, *,
                 groups: int = 1, act: bool = True) -> None:
        super().__init__()
        if opts.tf_padding and stride > 1:
            self.conv: nn.Conv2d = SameConv2d(in_ch, out_ch, kernel, stride, groups)
        else:
            self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=opts.bn_eps, momentum=opts.bn_momentum)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        # in place: BN's backward needs its input, not its output, so overwriting the output is safe
        return F.silu(x, inplace=True) if self.act else x

    def extra_repr(self) -> str:
        return f"act={self.act}"


class SqueezeExcite(nn.Module):
    """Channel gate: global mean -> 1x1 conv (squeeze) -> SiLU -> 1x1 conv -> sigmoid, both convs biased."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.expand(F.silu(self.reduce(s), inplace=True))
        return x * s.sigmoid()


class StochasticDepth(nn.Module):
    """Drops the whole residual branch of a sample with probability ``p`` in training, scales by 1/(1-p).

    The mask is a (B, 1, 1, 1) Bernoulli tensor drawn on the input's device: no host sync, no graph break.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class _Residual(nn.Module):
    """Shared residual logic: skip (and stochastic depth) only for stride 1 and in == out."""

    def _init_skip(self, in_ch: int, out_ch: int, stride: int, drop_prob: float) -> None:
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_path = StochasticDepth(drop_prob if self.has_skip else 0.0)

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.has_skip:
            return out
        out = self.drop_path(out)
        # in place: `out` is a fresh tensor that no backward formula saved (BN output or the mask product)
        return out.add_(x)


class FusedMBConv(_Residual):
    """kxk conv (in -> in*e) -> BN -> SiLU -> 1x1 conv (-> out) -> BN; with e == 1 the kxk conv goes
    straight to ``out`` and keeps its SiLU. No squeeze-excitation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_prob: float,
                 opts: LayerOptions) -> None:
        super().__init__()
        if expand == 1:
            self.fused = ConvBNAct(in_ch, out_ch, kernel, stride, opts)
            self.project: ConvBNAct | None = None
        else:
            self.fused = ConvBNAct(in_ch, in_ch * expand, kernel, stride, opts)
            self.project = ConvBNAct(in_ch * expand, out_ch, 1, 1, opts, act=False)
        self._init_skip(in_ch, out_ch, stride, drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fused(x)
        if self.project is not None:
            out = self.project(out)
        return self._finish(out, x)


class MBConv(_Residual):
    """1x1 expand -> BN -> SiLU -> depthwise kxk -> BN -> SiLU -> SE -> 1x1 project -> BN.

    The SE squeeze width is a fraction of the block's *input* channels, as in the official code.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, se_ratio: float,
                 drop_prob: float, opts: LayerOptions) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = ConvBNAct(in_ch, mid, 1, 1, opts) if expand != 1 else None
        self.dw = ConvBNAct(mid, mid, kernel, stride, opts, groups=mid)
        self.se = SqueezeExcite(mid, max(1, int(in_ch * se_ratio))) if se_ratio > 0 else None
        self.project = ConvBNAct(mid, out_ch, 1, 1, opts, act=False)
        self._init_skip(in_ch, out_ch, stride, drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.dw(out)
        if self.se is not None:
            out = self.se(out)
        return self._finish(self.project(out), x)
