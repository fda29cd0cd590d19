"""ShuffleNetV2 (Ma et al., 2018) in the module layout of the authors' Megvii / ACON code.

Module and state-dict names follow the released code (``first_conv.{0,1,2}``,
``features.{i}.branch_main.{0..7}``, ``features.{i}.branch_proj.{0..4}``, ``conv_last.{0,1,2}``,
``classifier.0``), so released checkpoints map onto this definition one to one. Every activation is
the injected one (stem, both main-branch activations, the projection branch and the last 1x1 conv),
which is the placement the paper uses for ACON.

``variant="official"`` is the ACON release (convolutions and classifier with bias); ``variant="megvii"``
is the original ShuffleNetV2 release (no conv bias, classifier without bias).

Differences from the released code, none of which changes a 224x224 result: the head pools globally
(the release uses a fixed 7x7 average pool), and ``small_input=True`` (stride-1 stem, no max-pool)
serves 32-64 px proxy datasets.

``se=True`` appends a squeeze-excite module to every main branch (after its last activation), as in
Megvii's ShuffleNetV2+; ``se_reduction`` (default 4) sets its hidden width C // r (see ``models.se``).
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from acon import ReLU, create_activation
from models.features import FeatureSpec
from models.megvii_layout import MegviiLayoutMixin
from models.se import DEFAULT_REDUCTION, check_reduction, shufflenet_se

WIDTHS: dict[str, tuple[int, int, int, int, int]] = {
    "0.5x": (24, 48, 96, 192, 1024),
    "1.0x": (24, 116, 232, 464, 1024),
    "1.5x": (24, 176, 352, 704, 1024),
    "2.0x": (24, 244, 488, 976, 2048),
}
STAGE_REPEATS = (4, 8, 4)
VARIANTS = ("official", "megvii")


def split_even_odd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split channels into (even, odd): the shuffle-then-split of the authors' stride-1 block."""
    return x[:, 0::2], x[:, 1::2]


class ShuffleV2Block(nn.Module):
    """ShuffleNetV2 unit; ``in_chs`` is the block's full input width, ``out_chs`` its output width."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int,
        act_layer: Callable[..., nn.Module],
        bias: bool,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleV2Block stride must be 1 or 2, got {stride}")
        if stride == 1 and in_chs != out_chs:
            raise ValueError(f"stride-1 ShuffleV2Block needs in_chs == out_chs, got {in_chs} -> {out_chs}")
        self.stride = stride
        branch_in = in_chs // 2 if stride == 1 else in_chs
        mid, main_out = out_chs // 2, out_chs - branch_in
        self.branch_main = nn.Sequential(
            nn.Conv2d(branch_in, mid, 1, 1, 0, bias=bias),
            nn.BatchNorm2d(mid),
            create_activation(act_layer, mid),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=bias),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, main_out, 1, 1, 0, bias=bias),
            nn.BatchNorm2d(main_out),
            create_activation(act_layer, main_out),
        )
        if se_reduction is not None:  # ShuffleNetV2+: squeeze-excite at the end of the main branch
            self.branch_main.append(shufflenet_se(main_out, se_reduction))
        self.branch_proj = None
        if stride == 2:
            self.branch_proj = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=bias),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, in_chs, 1, 1, 0, bias=bias),
                nn.BatchNorm2d(in_chs),
                create_activation(act_layer, in_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch_proj is None:
            passthrough, x = split_even_odd(x)
            return torch.cat((passthrough, self.branch_main(x)), 1)
        return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)


class ShuffleNetV2(MegviiLayoutMixin, nn.Module):
    """ShuffleNetV2 with an injected activation; ``channels`` = (stem, stage2, stage3, stage4, last)."""

    __constants__ = ["features_only"]

    def __init__(
        self,
        channels: Sequence[int],
        act_layer: Callable[..., nn.Module] = ReLU,
        num_classes: int = 1000,
        small_input: bool = False,
        variant: str = "official",
        drop_rate: float = 0.0,
        in_chans: int = 3,
        global_pool: str = "avg",
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
        se: bool = False,
        se_reduction: int = DEFAULT_REDUCTION["shufflenetv2"],
    ) -> None:
        super().__init__()
        se_reduction = check_reduction(se_reduction) if se else None
        if variant not in VARIANTS:
            raise ValueError(f"ShuffleNetV2 variant={variant!r} is not one of {VARIANTS}")
        if len(channels) != 5:
            raise ValueError(f"ShuffleNetV2 channels needs 5 widths, got {tuple(channels)}")
        bias = variant == "official"
        self.variant, self.in_chans = variant, in_chans
        stem = channels[0]
        self.first_conv = nn.Sequential(
            nn.Conv2d(in_chans, stem, 3, 1 if small_input else 2, 1, bias=bias),
            nn.BatchNorm2d(stem),
            create_activation(act_layer, stem),
        )
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        blocks, in_chs, self.stage_ends = [], stem, []
        for repeats, out_chs in zip(STAGE_REPEATS, channels[1:4], strict=True):
            for i in range(repeats):
                blocks.append(
                    ShuffleV2Block(in_chs, out_chs, 2 if i == 0 else 1, act_layer, bias, se_reduction)
                )
                in_chs = out_chs
            self.stage_ends.append(len(blocks) - 1)
        self.features = nn.Sequential(*blocks)
        self.conv_last = nn.Sequential(
            nn.Conv2d(in_chs, channels[4], 1, 1, 0, bias=bias),
            nn.BatchNorm2d(channels[4]),
            create_activation(act_layer, channels[4]),
        )
        self.init_megvii_head(channels[4], num_classes, global_pool, drop_rate, bias)
        self._initialize_weights()

        base = 1 if small_input else 4  # stride after the stem and max-pool
        specs = [
            FeatureSpec("first_conv.2", stem, 1 if small_input else 2),
            *(
                FeatureSpec(f"features.{e}", c, base * r)
                for e, c, r in zip(self.stage_ends, channels[1:4], (2, 4, 8), strict=True)
            ),
            FeatureSpec("conv_last.2", channels[4], base * 8),
        ]
        self.init_feature_info(specs, features_only, out_indices)

    def _initialize_weights(self) -> None:
        """Authors' init: convs N(0, 1/weight.shape[1]) (stem N(0, 0.01)), BN bias 1e-4, fc N(0, 0.01)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                std = 0.01 if name.startswith("first_conv.") else 1.0 / m.weight.shape[1]
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 1e-4)
                nn.init.zeros_(m.running_mean)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
