"""TFNet, the "toy funnel network" of Ma et al. (CVPR 2021): pointwise convolutions and ACON-FReLU only.

Layout (the authors' TFNet release, module names kept so released checkpoints load key for key):

- ``first_conv``: 3x3 stride-2 conv (bias) + BN + ReLU, ``int(16 * width)`` channels; the stem stays
  ReLU whatever the activation, as in the release.
- ``features``: four stages of 2 / 3 / 8 / 3 ``TFBlock``\\ s. A block is ``branch_main`` = 1x1 conv + BN +
  activation + 1x1 conv + BN, then the block activation ``acon`` on the sum with the input (stride 1) or on
  the concatenation [input, branch] (the first block of a stage: twice the channels, and ``acon`` has
  stride 2, so the activation does the downsampling).
- ``conv_last``: 1x1 conv to 1024 channels + BN + activation; global average pool, dropout 0.2 for widths
  above 0.5, ``classifier.0``.

The activation is injected (``act_layer``, default ACON-FReLU). An activation that takes a ``stride``
argument (ACON-FReLU) builds the stride-2 sites itself. Any other activation (e.g. ``relu`` for the
ablation) replaces the whole ACON-FReLU module, funnel and BatchNorms included, and a stride-2 site then
becomes ``Sequential(MaxPool2d(3, 2, 1), activation)``: the max-pooled identity path of the stride-2
ACON-FReLU, without the funnel. So ``activation=relu`` is TFNet without any spatial convolution after the
stem, which is what "replace ACON-FReLU by ReLU" means for this network.

Differences from the release that do not change a 224x224 result: global average pooling instead of a
fixed 7x7 pool, and ``small_input=True`` (stride-1 stem) for 16-64 px proxy data.

The layout is ShuffleNetV2's (``models.megvii_layout``), which gives TFNet timm's model protocol and
``features_only`` / ``out_indices``: feature index 0 is the stem, 1-4 the four stages (strides 4-32),
5 the last 1x1 conv.
"""

# No postponed annotations here: FX copies forward()'s annotations into code that TorchScript compiles.

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from acon import AconFReLU, ReLU, create_activation
from models.features import FeatureSpec
from models.megvii_layout import MegviiLayoutMixin

WIDTHS = (0.5, 1.0, 1.5, 2.0)
STAGE_REPEATS = (2, 3, 8, 3)
LAST_CHANNELS = 1024


def _takes_stride(act_layer: Callable[..., nn.Module]) -> bool:
    target = act_layer.func if isinstance(act_layer, functools.partial) else act_layer
    try:
        return "stride" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def activation_site(act_layer: Callable[..., nn.Module], channels: int, stride: int = 1) -> nn.Module:
    """The activation at one TFNet site; a stride-2 site of a stride-less activation max-pools first."""
    if _takes_stride(act_layer):
        return create_activation(act_layer, channels, stride=stride)
    act = create_activation(act_layer, channels)
    return act if stride == 1 else nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=2, padding=1), act)


class TFBlock(nn.Module):
    """Two 1x1 convs around an activation, then the block activation on the sum (stride 1) or the concat."""

    def __init__(self, in_chs: int, stride: int, act_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"TFBlock stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.branch_main = nn.Sequential(
            nn.Conv2d(in_chs, in_chs, 1, 1, 0, bias=True),
            nn.BatchNorm2d(in_chs),
            activation_site(act_layer, in_chs),
            nn.Conv2d(in_chs, in_chs, 1, 1, 0, bias=True),
            nn.BatchNorm2d(in_chs),
        )
        self.acon = activation_site(act_layer, in_chs * stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch_main(x)
        return self.acon(x + y if self.stride == 1 else torch.cat((x, y), 1))


class TFNet(MegviiLayoutMixin, nn.Module):
    """TFNet at ``width`` (0.5 / 1.0 / 1.5 / 2.0) with an injected activation (default ACON-FReLU)."""

    __constants__ = ["features_only"]

    def __init__(
        self,
        width: float,
        act_layer: Callable[..., nn.Module] = AconFReLU,
        num_classes: int = 1000,
        small_input: bool = False,
        drop_rate: float | None = None,
        in_chans: int = 3,
        global_pool: str = "avg",
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
    ) -> None:
        super().__init__()
        stem = int(16 * width)
        self.width, self.in_chans = width, in_chans
        self.first_conv = nn.Sequential(
            nn.Conv2d(in_chans, stem, 3, 1 if small_input else 2, 1, bias=True),
            nn.BatchNorm2d(stem),
            ReLU(stem, inplace=True),
        )
        self.maxpool = nn.Identity()  # none after the stem: the stride-2 activations downsample
        blocks, chs, self.stage_ends = [], stem, []
        for repeats in STAGE_REPEATS:
            for i in range(repeats):
                blocks.append(TFBlock(chs, 2 if i == 0 else 1, act_layer))
                chs = chs * 2 if i == 0 else chs
            self.stage_ends.append(len(blocks) - 1)
        self.features = nn.Sequential(*blocks)
        self.conv_last = nn.Sequential(
            nn.Conv2d(chs, LAST_CHANNELS, 1, 1, 0, bias=True),
            nn.BatchNorm2d(LAST_CHANNELS),
            activation_site(act_layer, LAST_CHANNELS),
        )
        drop_rate = (0.2 if width > 0.5 else 0.0) if drop_rate is None else drop_rate
        self.init_megvii_head(LAST_CHANNELS, num_classes, global_pool, drop_rate, bias=True)
        self._initialize_weights()
        base = 1 if small_input else 2  # stride after the stem
        specs = [FeatureSpec("first_conv.2", stem, base)]
        specs += [
            FeatureSpec(f"features.{e}", stem * 2 ** (i + 1), base * 2 ** (i + 1))
            for i, e in enumerate(self.stage_ends)
        ]
        specs.append(FeatureSpec("conv_last.2", LAST_CHANNELS, base * 2 ** len(self.stage_ends)))
        self.init_feature_info(specs, features_only, out_indices)

    def _initialize_weights(self) -> None:
        """Authors' init: convs N(0, 1/weight.shape[1]), stem and funnel convs N(0, 0.01); BN bias 1e-4."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                small = name.startswith("first_conv.") or name.endswith("conv_frelu")
                nn.init.normal_(m.weight, 0.0, 0.01 if small else 1.0 / m.weight.shape[1])
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 1e-4)
                nn.init.zeros_(m.running_mean)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
