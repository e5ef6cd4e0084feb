"""The EfficientNetV2 network and the builder that turns a stage table into modules."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .blocks import ConvBNAct, FusedMBConv, LayerOptions, MBConv
from .config import CONFIGS, ModelConfig
from .config_file import get_config


class EfficientNetV2(nn.Module):
    """stem (3x3 conv, BN, SiLU) -> stages of Fused-MBConv / MBConv blocks -> head (1x1 conv, BN, SiLU)
    -> global average pool -> dropout -> linear classifier.

    ``drop_path_rate`` follows the official linear rule: block i of N (0-based over all blocks) is
    dropped with probability ``drop_path_rate * i / N``; only residual blocks have stochastic depth.
    """

    def __init__(self, config: ModelConfig, num_classes: int = 1000, *, drop_rate: float | None = None,
                 drop_path_rate: float = 0.2, bn_momentum: float = 0.1, bn_eps: float = 1e-3,
                 tf_padding: bool = False) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.config = config
        self.num_classes = num_classes
        self.tf_padding = tf_padding
        opts = LayerOptions(bn_eps=bn_eps, bn_momentum=bn_momentum, tf_padding=tf_padding)

        stages = config.scaled_stages()
        self.stem = ConvBNAct(3, stages[0].in_ch, 3, config.stem_stride, opts)
        total, index = config.num_blocks, 0
        self.stages = nn.Sequential()
        for spec in stages:
            blocks = []
            for j in range(spec.repeats):
                in_ch, stride = (spec.in_ch, spec.stride) if j == 0 else (spec.out_ch, 1)
                p = drop_path_rate * index / total
                if spec.block == "fused":
                    blocks.append(FusedMBConv(in_ch, spec.out_ch, spec.kernel, stride, spec.expand, p, opts))
                else:
                    blocks.append(MBConv(in_ch, spec.out_ch, spec.kernel, stride, spec.expand, spec.se, p, opts))
                index += 1
            self.stages.append(nn.Sequential(*blocks))
        self.num_features = config.head_channels
        self.head = ConvBNAct(stages[-1].out_ch, self.num_features, 1, 1, opts)
        self.dropout = nn.Dropout(config.dropout if drop_rate is None else drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.apply(_init_weights)

    def blocks(self) -> list[FusedMBConv | MBConv]:
        """All blocks in order, flattened across stages."""
        return [b for stage in self.stages for b in stage]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map after the head conv: (B, num_features, H/32, W/32) for the official models."""
        _check_input(x)
        return self.head(self.stages(self.stem(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pool -> dropout -> classifier: logits (B, num_classes)."""
        return self.classifier(self.dropout(features.mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_dropout(self, p: float) -> None:
        """Change the head dropout (progressive learning raises it from stage to stage)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.dropout.p = p

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs (fine-tuning)."""
        _check_num_classes(num_classes)
        old = self.classifier
        self.classifier = nn.Linear(self.num_features, num_classes, device=old.weight.device,
                                    dtype=old.weight.dtype)
        _init_weights(self.classifier)
        self.num_classes = num_classes


def _check_num_classes(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_classes must be a positive int, got {n!r}")


def _check_input(x: torch.Tensor) -> None:
    """Reject bad input with a clear message. Looks only at rank, dtype and channels, which are static
    under torch.compile: no host sync, no graph break."""
    if x.dim() != 4 or not x.is_floating_point() or x.shape[1] != 3:
        raise ValueError(f"EfficientNetV2 expects a float image batch of shape (B, 3, H, W); "
                         f"got shape {tuple(x.shape)} dtype {x.dtype}")


@torch.no_grad()
def _init_weights(m: nn.Module) -> None:
    """Official init. Convs: normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups, which is what TF's
    kernel shape gives (a depthwise kernel has one output per group). Linear: uniform(+-1/sqrt(classes))."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            m.bias.zero_()
    elif isinstance(m, nn.BatchNorm2d):
        m.weight.fill_(1.0)
        m.bias.zero_()
    elif isinstance(m, nn.Linear):
        bound = 1.0 / math.sqrt(m.out_features)
        m.weight.uniform_(-bound, bound)
        m.bias.zero_()


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`; the last, ``efficientnetv2-demo``, is not an official model."""
    return list(CONFIGS)


def create_model(model: str | os.PathLike | ModelConfig, num_classes: int = 1000, *,
                 drop_rate: float | None = None, drop_path_rate: float = 0.2, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-3, tf_padding: bool = False) -> EfficientNetV2:
    """Build a model from a registered name, a model config file (``runs/search/best.json``) or a ModelConfig.

    ``drop_rate=None`` uses the model's own dropout; ``tf_padding=True`` uses TF "SAME" padding, needed to
    reproduce the official weights (timm ``tf_efficientnetv2_*``) exactly.
    """
    return EfficientNetV2(get_config(model), num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                          bn_momentum=bn_momentum, bn_eps=bn_eps, tf_padding=tf_padding)
