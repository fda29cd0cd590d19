"""Squeeze-excite modules for the SENet comparison (``se=True`` on ShuffleNetV2 and ResNet).

Both are timm's ``SEModule`` (global mean, 1x1 conv, ReLU, 1x1 conv, gate, rescale), configured as in
the two reference designs:

- ResNet: SE-ResNet (Hu et al., 2018): convs with bias, no BatchNorm, sigmoid gate, hidden C // 16;
- ShuffleNetV2: Megvii's ShuffleNetV2+ ``SELayer``: convs without bias, a BatchNorm after the first,
  hard-sigmoid gate (relu6(x + 3) / 6), hidden C // 4.

The reduction ratio is configurable (``se_reduction``); the hidden width is ``max(1, C // r)``.
"""

from __future__ import annotations

from timm.layers import SEModule
from torch import nn

DEFAULT_REDUCTION = {"resnet": 16, "shufflenetv2": 4}


def check_reduction(reduction: int) -> int:
    """``reduction`` if it is a positive integer; else a ValueError naming it."""
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"se_reduction must be a positive integer, got {reduction!r}")
    return reduction


def resnet_se(channels: int, reduction: int = 16) -> nn.Module:
    """SE-ResNet's squeeze-excite on ``channels`` (sigmoid gate, biases, no BatchNorm)."""
    return SEModule(channels, rd_channels=max(1, channels // reduction))


def shufflenet_se(channels: int, reduction: int = 4) -> nn.Module:
    """ShuffleNetV2+'s squeeze-excite on ``channels`` (no biases, BatchNorm, hard-sigmoid gate)."""
    hidden = max(1, channels // reduction)
    return SEModule(
        channels, rd_channels=hidden, bias=False, norm_layer=nn.BatchNorm2d, gate_layer="hard_sigmoid"
    )
