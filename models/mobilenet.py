"""MobileNetV1 and MobileNetV2 baselines with an injected activation (the TFNet table and the abstract).

MobileNetV2 (Sandler et al., 2018) follows torchvision's definition and channel rounding (every width
rounded to a multiple of 8, never below 90% of the exact value; the last 1x1 conv keeps 1280 channels for
width <= 1), so with ReLU it counts exactly torchvision's ``mobilenet_v2(width_mult=w)`` params and MACs.
The activation is injected at every ReLU6 site of the original: stem, expansion 1x1, depthwise 3x3 and the
last 1x1 conv; the projection 1x1 stays linear. MobileNetV1 (Howard et al., 2017): a 3x3 stem and 13
depthwise-separable blocks, the activation after every BatchNorm, widths ``int(c * width)``.

``small_input=True`` makes the stem stride 1 for 16-64 px proxy data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models._utils import _make_divisible

from acon import ReLU, create_activation

# MobileNetV2: (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2))
V2_SETTING += ((6, 320, 1, 1),)
# MobileNetV1: (output channels, stride) of the 13 depthwise-separable blocks.
V1_SETTING = (
    ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)) + ((512, 1),) * 5 + ((1024, 2), (1024, 1))
)


def conv_bn_act(
    in_chs: int, out_chs: int, kernel: int, stride: int, act_layer: Callable | None, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias) + BN (+ the activation unless ``act_layer`` is None)."""
    layers = [nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False)]
    layers.append(nn.BatchNorm2d(out_chs))
    if act_layer is not None:
        layers.append(create_activation(act_layer, out_chs))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 + act, depthwise 3x3 + act, linear 1x1; residual when shapes agree."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: int, act_layer: Callable) -> None:
        super().__init__()
        hidden = in_chs * expand
        layers = [conv_bn_act(in_chs, hidden, 1, 1, act_layer)] if expand != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, act_layer, groups=hidden)]
        layers += [conv_bn_act(hidden, out_chs, 1, 1, None)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class _Classifier(nn.Module):
    """Shared head and init of both MobileNets: global average pool, dropout, linear."""

    def _make_head(self, features: int, num_classes: int, drop_rate: float) -> None:
        self.num_features, self.num_classes = features, num_classes
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled output of the last conv."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, dropout and classifier."""
        x = self.dropout(torch.flatten(x.mean((2, 3), keepdim=True), 1))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class MobileNetV2(_Classifier):
    """MobileNetV2 at ``width`` (torchvision's channel rounding) with an injected activation."""

    def __init__(
        self,
        width: float,
        act_layer: Callable[..., nn.Module] = ReLU,
        num_classes: int = 1000,
        small_input: bool = False,
        drop_rate: float = 0.2,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        chs = _make_divisible(32 * width, 8)
        layers = [conv_bn_act(in_chans, chs, 3, 1 if small_input else 2, act_layer)]
        for t, c, n, s in V2_SETTING:
            out = _make_divisible(c * width, 8)
            for i in range(n):
                layers.append(InvertedResidual(chs, out, s if i == 0 else 1, t, act_layer))
                chs = out
        last = _make_divisible(1280 * max(1.0, width), 8)
        layers.append(conv_bn_act(chs, last, 1, 1, act_layer))
        self.features = nn.Sequential(*layers)
        self._make_head(last, num_classes, drop_rate)


class MobileNetV1(_Classifier):
    """MobileNetV1 at ``width`` (channels ``int(c * width)``) with an injected activation."""

    def __init__(
        self,
        width: float,
        act_layer: Callable[..., nn.Module] = ReLU,
        num_classes: int = 1000,
        small_input: bool = False,
        drop_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        chs = int(32 * width)
        layers = [conv_bn_act(in_chans, chs, 3, 1 if small_input else 2, act_layer)]
        for c, s in V1_SETTING:
            out = int(c * width)
            layers.append(
                nn.Sequential(
                    conv_bn_act(chs, chs, 3, s, act_layer, groups=chs), conv_bn_act(chs, out, 1, 1, act_layer)
                )
            )
            chs = out
        self.features = nn.Sequential(*layers)
        self._make_head(chs, num_classes, drop_rate)
