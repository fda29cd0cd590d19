"""MobileNetV1 and MobileNetV2 baselines with an injected activation (the TFNet table and the abstract).

MobileNetV2 (Sandler et al., 2018) follows torchvision's definition and channel rounding (every width
rounded to a multiple of 8, never below 90% of the exact value; the last 1x1 conv keeps 1280 channels for
width <= 1), so with ReLU it counts exactly torchvision's ``mobilenet_v2(width_mult=w)`` params and MACs.
The activation is injected at every ReLU6 site of the original: stem, expansion 1x1, depthwise 3x3 and the
last 1x1 conv; the projection 1x1 stays linear. MobileNetV1 (Howard et al., 2017): a 3x3 stem and 13
depthwise-separable blocks, the activation after every BatchNorm, widths ``int(c * width)``.

``small_input=True`` makes the stem stride 1 for 16-64 px proxy data.

Both follow timm's model protocol (``models.timm_api``): ``features`` holds every layer, stem first and
the last conv last; feature index 0 is the stem with the layers at its stride, 1-4 end where the next
layer downsamples (strides 4-32, the last with the last conv).
"""

# No postponed annotations here: FX copies forward()'s annotations into code that TorchScript compiles.

import math
from collections.abc import Callable, Sequence

import torch
from timm.models import checkpoint_seq
from torch import nn
from torchvision.models._utils import _make_divisible

from acon import ReLU, create_activation
from models.timm_api import DropoutHeadMixin

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


def stage_ends(strides: Sequence[int]) -> list[int]:
    """Index of the last layer before each stride-2 layer after the first, and of the last layer."""
    return [i - 1 for i, s in enumerate(strides) if s > 1 and i > 0] + [len(strides) - 1]


class _MobileNet(DropoutHeadMixin, nn.Module):
    """What both MobileNets share: ``features`` (stem first, last conv last), the head, timm's protocol.

    ``layers`` are given as (module, stride, output channels). Feature index 0 is the stem with the layers
    at its stride (timm's choice for MobileNetV2); indices 1-4 end where the next layer downsamples, the
    last one with the last conv."""

    def _build(
        self, layers: list[tuple[nn.Module, int, int]], num_classes: int, drop_rate: float, global_pool: str
    ) -> None:
        modules, strides, channels = zip(*layers, strict=True)
        self.features = nn.Sequential(*modules)
        self.stage_ends = stage_ends(strides)
        self.feature_info = [
            dict(module=f"features.{e}", num_chs=channels[e], reduction=math.prod(strides[: e + 1]))
            for e in self.stage_ends
        ]
        self.init_dropout_head(channels[-1], num_classes, global_pool, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Feature index 0: the stem and the layers at its stride."""
        return self.features[: self.stage_ends[0] + 1](x)

    def stage_list(self) -> list[nn.Module]:
        """The layers of feature indices 1-4 (slices of ``features``)."""
        ends = self.stage_ends
        return [self.features[a + 1 : e + 1] for a, e in zip(ends[:-1], ends[1:], strict=True)]

    def drop_stages_after(self, index: int) -> None:
        """Remove the layers after feature index ``index``."""
        self.features = self.features[: self.stage_ends[max(index, 0)] + 1]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups: the stem conv, then one group per layer of ``features``."""
        return dict(stem=r"^features\.0\.", blocks=r"^features\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled output of the last conv."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class MobileNetV2(_MobileNet):
    """MobileNetV2 at ``width`` (torchvision's channel rounding) with an injected activation."""

    def __init__(
        self,
        width: float,
        act_layer: Callable[..., nn.Module] = ReLU,
        num_classes: int = 1000,
        small_input: bool = False,
        drop_rate: float = 0.2,
        in_chans: int = 3,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        chs, stride = _make_divisible(32 * width, 8), 1 if small_input else 2
        layers = [(conv_bn_act(in_chans, chs, 3, stride, act_layer), stride, chs)]
        for t, c, n, s in V2_SETTING:
            out = _make_divisible(c * width, 8)
            for i in range(n):
                stride = s if i == 0 else 1
                layers.append((InvertedResidual(chs, out, stride, t, act_layer), stride, out))
                chs = out
        last = _make_divisible(1280 * max(1.0, width), 8)
        layers.append((conv_bn_act(chs, last, 1, 1, act_layer), 1, last))
        self._build(layers, num_classes, drop_rate, global_pool)


class MobileNetV1(_MobileNet):
    """MobileNetV1 at ``width`` (channels ``int(c * width)``) with an injected activation."""

    def __init__(
        self,
        width: float,
        act_layer: Callable[..., nn.Module] = ReLU,
        num_classes: int = 1000,
        small_input: bool = False,
        drop_rate: float = 0.0,
        in_chans: int = 3,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        chs, stride = int(32 * width), 1 if small_input else 2
        layers = [(conv_bn_act(in_chans, chs, 3, stride, act_layer), stride, chs)]
        for c, s in V1_SETTING:
            out = int(c * width)
            dw_pw = nn.Sequential(
                conv_bn_act(chs, chs, 3, s, act_layer, groups=chs), conv_bn_act(chs, out, 1, 1, act_layer)
            )
            layers.append((dw_pw, s, out))
            chs = out
        self._build(layers, num_classes, drop_rate, global_pool)
