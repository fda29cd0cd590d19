"""The paper's complexity numbers as data, plus the exact counts our definitions must reproduce.

Two kinds of golden data (pycls style):

- ``PAPER`` / ``WELL_KNOWN``: the published, rounded numbers. ``PAPER`` is the table of Ma et al.
  (CVPR 2021) as quoted in issue 3; ``WELL_KNOWN`` are the ReLU baselines' published counts (Megvii
  ShuffleNetV2 README, He et al. 2016 / torchvision ResNet). The published numbers follow one
  convention, reproduced by ``paper_params`` and ``paper_flops``:

  * params: convolution, linear and activation parameters, *without* BatchNorm affine parameters and
    without conv biases (the BN-folded count), i.e. the bias-free variant minus its BN parameters;
  * FLOPs: multiply-accumulates at 224x224 of the official variant (ResNet v1: stride on the first
    1x1 conv; ResNet v1.5 counts 4.09G for ResNet-50).

  The paper prints one params number for ReLU / Swish / ACON-C: it is the ReLU count. Swish and ACON-C
  add C and 3C parameters per activation site (tested exactly), less than one printed unit.

  Each value is checked to its printed precision: the count, rounded to the last printed digit
  (half up unless the row states otherwise), equals the printed value. Two sources round differently,
  recorded per row: ShuffleNetV2 0.5x FLOPs (40.48M printed as 41M, rounded up) and ResNet-34 FLOPs
  (3.66G printed as 3.6G, rounded down).

- ``EXACT``: our exact counts for every model x activation, both variants, at 224x224, 1000 classes.
  ``Counts`` fields: params and MACs of the default (``variant="official"``) model, params and MACs of
  the alternative variant (``"megvii"`` for ShuffleNetV2, ``"torchvision"`` for ResNet), and the
  BatchNorm affine parameters (equal in both variants).
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import NamedTuple

ACTIVATIONS = ("relu", "swish", "acon_c", "meta_acon")
ALT_VARIANT = {"shufflenetv2": "megvii", "resnet": "torchvision"}
_UNITS = {"M": 10**6, "G": 10**9}
_ROUNDING = {"nearest": ROUND_HALF_UP, "up": ROUND_CEILING, "down": ROUND_FLOOR}


class Counts(NamedTuple):
    """Exact parameter and MAC counts of one model x activation."""

    params: int
    macs: int
    alt_params: int
    alt_macs: int
    bn_params: int

    @property
    def paper_params(self) -> int:
        """Parameters in the paper's convention: bias-free variant without BatchNorm affine params."""
        return self.alt_params - self.bn_params

    @property
    def paper_flops(self) -> int:
        """MACs in the paper's convention: the official variant (ResNet v1)."""
        return self.macs


class Published(NamedTuple):
    """One published, rounded number: ``value`` as printed (e.g. "3.9G") and the source's rounding."""

    value: str
    rounding: str = "nearest"

    @property
    def unit(self) -> int:
        """One unit of the last printed digit, as a count (e.g. 10**8 for "3.9G")."""
        exponent = Decimal(self.value[:-1]).as_tuple().exponent
        return int(Decimal(_UNITS[self.value[-1]]).scaleb(exponent))

    def matches(self, count: int) -> bool:
        """Whether ``count`` rounds to the printed value at its printed precision."""
        digits, unit = Decimal(self.value[:-1]), _UNITS[self.value[-1]]
        exponent = digits.as_tuple().exponent
        rounded = (Decimal(count) / unit).quantize(Decimal(1).scaleb(exponent), _ROUNDING[self.rounding])
        return rounded == digits


# Ma et al., CVPR 2021 (issue 3's table): FLOPs; params with ReLU / Swish / ACON-C; params with Meta-ACON.
PAPER: dict[str, dict[str, Published]] = {
    "shufflenetv2_x0_5": {
        "flops": Published("41M", "up"),
        "params": Published("1.4M"),
        "params_meta_acon": Published("1.7M"),
    },
    "shufflenetv2_x1_5": {
        "flops": Published("299M"),
        "params": Published("3.5M"),
        "params_meta_acon": Published("3.9M"),
    },
    "resnet50": {
        "flops": Published("3.9G"),
        "params": Published("25.5M"),
        "params_meta_acon": Published("25.7M"),
    },
    "resnet101": {
        "flops": Published("7.6G"),
        "params": Published("44.4M"),
        "params_meta_acon": Published("44.8M"),
    },
    "resnet152": {
        "flops": Published("11.3G"),
        "params": Published("60.0M"),
        "params_meta_acon": Published("60.5M"),
    },
}

# Published ReLU baselines: Megvii ShuffleNetV2 README; He et al. 2016 (FLOPs) and torchvision (params).
WELL_KNOWN: dict[str, dict[str, Published]] = {
    "shufflenetv2_x1_0": {"flops": Published("146M"), "params": Published("2.3M")},
    "shufflenetv2_x2_0": {"flops": Published("591M"), "params": Published("7.4M")},
    "resnet18": {"flops": Published("1.8G"), "params": Published("11.7M")},
    "resnet34": {"flops": Published("3.6G", "down"), "params": Published("21.8M")},
}

# Exact counts (224x224, 1000 classes), generated once from the definitions and frozen here.
EXACT: dict[str, dict[str, Counts]] = {
    "shufflenetv2_x0_5": {
        "relu": Counts(1370768, 40476448, 1365792, 40476448, 7952),
        "swish": Counts(1373712, 40476448, 1368736, 40476448, 7952),
        "acon_c": Counts(1379600, 40476448, 1374624, 40476448, 7952),
        "meta_acon": Counts(1686620, 40776224, 1681644, 40776224, 14744),
    },
    "shufflenetv2_x1_0": {
        "relu": Counts(2287850, 145814296, 2278760, 145814296, 16180),
        "swish": Counts(2293480, 145814296, 2284390, 145814296, 16180),
        "acon_c": Counts(2304740, 145814296, 2295650, 145814296, 16180),
        "meta_acon": Counts(2596384, 146092760, 2587294, 146092760, 28720),
    },
    "shufflenetv2_x1_5": {
        "relu": Counts(3519440, 298970656, 3506720, 298970656, 23440),
        "swish": Counts(3527440, 298970656, 3514720, 298970656, 23440),
        "acon_c": Counts(3543440, 298970656, 3530720, 298970656, 23440),
        "meta_acon": Counts(3953842, 299362976, 3941122, 299362976, 40828),
    },
    "shufflenetv2_x2_0": {
        "relu": Counts(7420458, 590783000, 7402600, 590783000, 33716),
        "swish": Counts(7432168, 590783000, 7414310, 590783000, 33716),
        "acon_c": Counts(7455588, 590783000, 7437730, 590783000, 33716),
        "meta_acon": Counts(8437946, 591739448, 8420088, 591739448, 58796),
    },
    "resnet18": {
        "relu": Counts(11694312, 1814073344, 11689512, 1814073344, 9600),
        "swish": Counts(11698152, 1814073344, 11693352, 1814073344, 9600),
        "acon_c": Counts(11705832, 1814073344, 11701032, 1814073344, 9600),
        "meta_acon": Counts(11902888, 1814261760, 11898088, 1814261760, 17920),
    },
    "resnet34": {
        "relu": Counts(21806184, 3663761408, 21797672, 3663761408, 17024),
        "swish": Counts(21813736, 3663761408, 21805224, 3663761408, 17024),
        "acon_c": Counts(21828840, 3663761408, 21820328, 3663761408, 17024),
        "meta_acon": Counts(22185736, 3664101376, 22177224, 3664101376, 33344),
    },
    "resnet50": {
        "relu": Counts(25583592, 3857973248, 25557032, 4089184256, 53120),
        "swish": Counts(25587368, 3857973248, 25560808, 4089184256, 53120),
        "acon_c": Counts(25594920, 3857973248, 25568360, 4089184256, 53120),
        "meta_acon": Counts(25773368, 3858143232, 25746808, 4089354240, 61280),
    },
    "resnet101": {
        "relu": Counts(44601832, 7570194432, 44549160, 7801405440, 105344),
        "swish": Counts(44609960, 7570194432, 44557288, 7801405440, 105344),
        "acon_c": Counts(44626216, 7570194432, 44573544, 7801405440, 105344),
        "meta_acon": Counts(44953448, 7570503680, 44900776, 7801714688, 122752),
    },
    "resnet152": {
        "relu": Counts(60268520, 11282415616, 60192808, 11513626624, 151424),
        "swish": Counts(60280488, 11282415616, 60204776, 11513626624, 151424),
        "acon_c": Counts(60304424, 11282415616, 60228712, 11513626624, 151424),
        "meta_acon": Counts(60763032, 11282847744, 60687320, 11514058752, 177056),
    },
}


# Activations beyond the paper's (configs/activation, docs/modern-activations.md), default variant, 224x224:
# GELU, Mish, Hard-Swish, SiLU and CELU have no parameters (ReLU's counts); per-channel PReLU adds C per site
# (Swish's params); FReLU adds a 3x3 depthwise conv with bias (10C) and a BatchNorm (2C) per site, and the
# conv's 9·C·H·W MACs. FReLU's exact (params, MACs, BatchNorm affine params), default variant only.
PARAMETER_FREE_ADDED = ("gelu", "mish", "hard_swish", "silu", "celu")
FRELU_EXACT: dict[str, tuple[int, int, int]] = {
    "shufflenetv2_x0_5": (1406096, 47871136, 13840),
    "resnet18": (11740392, 1827620864, 17280),
    "resnet50": (25628904, 3870391808, 60672),
}

# --- The TFNet table's families (TFNet, MobileNetV2, and MobileNetV1 0.25 of the abstract) ------------------
# These have one variant, so the published convention is computed from the default model directly:
# params without BatchNorm affine parameters and without the biases of convolutions that a BatchNorm follows
# (all of TFNet's, including ACON-FReLU's funnel conv; MobileNet convs have none), MACs at 224x224.


class LightCounts(NamedTuple):
    """Exact counts of one TFNet / MobileNet x activation: params, MACs, BN affine and conv-bias params."""

    params: int
    macs: int
    bn_params: int
    conv_bias_params: int

    @property
    def paper_params(self) -> int:
        """Parameters in the published (BN-folded) convention."""
        return self.params - self.bn_params - self.conv_bias_params

    @property
    def paper_flops(self) -> int:
        """MACs at 224x224."""
        return self.macs


LIGHT_ACTIVATIONS = {
    "tfnet": ("acon_frelu", "relu"),
    "mobilenetv2": ("relu", "acon_c", "meta_acon"),
    "mobilenetv1": ("relu", "acon_c", "meta_acon"),
}

# conv_bias_params counts network convs only (Meta-ACON's fc1/fc2 biases stay, as in the ShuffleNetV2 rows).
LIGHT_EXACT: dict[str, dict[str, LightCounts]] = {
    "tfnet_x0_5": {
        "acon_frelu": LightCounts(1344504, 42450560, 17488, 5792),
        "relu": LightCounts(1303176, 35846144, 5680, 2840),
    },
    "tfnet_x1_0": {
        "acon_frelu": LightCounts(1923336, 134805760, 28832, 9536),
        "relu": LightCounts(1855016, 122048512, 9312, 4656),
    },
    "tfnet_x1_5": {
        "acon_frelu": LightCounts(2778904, 278541184, 40176, 13280),
        "relu": LightCounts(2683592, 259631104, 12944, 6472),
    },
    "tfnet_x2_0": {
        "acon_frelu": LightCounts(3911208, 473656832, 51520, 17024),
        "relu": LightCounts(3788904, 448593920, 16576, 8288),
    },
    "mobilenetv2_x0_17": {
        "relu": LightCounts(1445720, 32017504, 9360, 0),
        "acon_c": LightCounts(1458824, 32017504, 9360, 0),
        "meta_acon": LightCounts(1773048, 32321120, 19344, 0),
    },
    "mobilenetv2_x0_6": {
        "relu": LightCounts(2217000, 150958928, 22176, 0),
        "acon_c": LightCounts(2247480, 150958928, 22176, 0),
        "meta_acon": LightCounts(2917482, 151606288, 44044, 0),
    },
    "mobilenetv2_x1_0": {
        "relu": LightCounts(3504872, 300774272, 34112, 0),
        "acon_c": LightCounts(3551528, 300774272, 34112, 0),
        "meta_acon": LightCounts(4941624, 302130048, 67360, 0),
    },
    "mobilenetv2_x1_4": {
        "relu": LightCounts(6108776, 582195824, 47936, 0),
        "acon_c": LightCounts(6174344, 582195824, 47936, 0),
        "meta_acon": LightCounts(8855730, 584829232, 94492, 0),
    },
    "mobilenetv1_x0_25": {
        "relu": LightCounts(470072, 41030272, 5472, 0),
        "acon_c": LightCounts(478280, 41030272, 5472, 0),
        "meta_acon": LightCounts(572600, 41117824, 11808, 0),
    },
}

# The authors' TFNet README table (FLOPs, params) and MobileNet V1 0.25 (Howard et al., 2017). Every TFNet
# FLOPs figure is our count rounded up (as ShuffleNetV2 0.5x's 41M; only 0.5 differs from nearest: 42.45M).
TFNET_TABLE: dict[str, dict[str, Published]] = {
    "tfnet_x0_5": {"flops": Published("43M", "up"), "params": Published("1.3M")},
    "tfnet_x1_0": {"flops": Published("135M", "up"), "params": Published("1.9M")},
    "tfnet_x1_5": {"flops": Published("279M", "up"), "params": Published("2.7M")},
    "tfnet_x2_0": {"flops": Published("474M", "up"), "params": Published("3.8M")},
    "mobilenetv2_x0_17": {"flops": Published("42M"), "params": Published("1.4M")},
    "mobilenetv2_x0_6": {"flops": Published("141M"), "params": Published("2.2M")},
    "mobilenetv2_x1_0": {"flops": Published("300M", "down"), "params": Published("3.4M", "down")},
    "mobilenetv2_x1_4": {"flops": Published("585M"), "params": Published("5.5M")},
    "mobilenetv1_x0_25": {"flops": Published("41M"), "params": Published("0.5M")},
}

# Published MobileNetV2 figures our (torchvision) definition does not reproduce, and why. 0.17x / 0.6x are
# the ShuffleNetV2 paper's own, unreleased implementation (torchvision rounding: 32M / 151M); 1.4x's 585M is
# the MobileNetV2 paper's figure (torchvision and TF-slim count 582M), and its 5.5M params fit no public
# definition we know (torchvision 6.1M, the MobileNetV2 paper 6.9M).
TFNET_TABLE_DIFFERS: dict[str, tuple[str, ...]] = {
    "mobilenetv2_x0_17": ("flops",),
    "mobilenetv2_x0_6": ("flops",),
    "mobilenetv2_x1_4": ("flops", "params"),
}

# Squeeze-excite (``se=True``, default reduction: ShuffleNetV2 4, ResNet 16), ReLU, default variant, 224x224:
# (params, MACs). SE-ResNet-50 is 28.1M / 3.86G as published by Hu et al. (2018).
SE_EXACT: dict[str, tuple[int, int]] = {
    "shufflenetv2_x0_5": (1400000, 40505248),
    "shufflenetv2_x1_5": (3915936, 299365536),
    "resnet18": (11783392, 1814160384),
    "resnet50": (28114584, 3860488192),
}
