"""ResNet-18/34/50/101/152 with an injected activation, in the layout of the authors' ACON code.

Placement (``act_placement``):

- ``"paper"``: in a Bottleneck only the activation after the 3x3 conv (``acon``) is the injected one;
  the activation after the first 1x1 conv (``act1``), after the addition (``act3``) and in the stem
  stay ReLU. In a BasicBlock both activations (``acon1`` after the first conv, ``acon2`` after the
  addition) are injected; the stem stays ReLU.
- ``"all"``: every activation, stem included, is the injected one (ablation).

Variants (``variant``):

- ``"official"``: the authors' release: ResNet v1 (the stride of a Bottleneck sits on its first 1x1
  conv) and every convolution has a bias.
- ``"torchvision"``: ResNet v1.5 (stride on the 3x3 conv), convolutions without bias; with ReLU its
  state dict is key-for-key that of ``torchvision.models.resnetXX``.

``small_input=True`` replaces the 7x7 stride-2 stem and the max-pool with a 3x3 stride-1 conv (the
CIFAR-style stem) for 32-64 px proxy datasets.

``se=True`` adds SE-ResNet's squeeze-excite on the residual branch, after the last BatchNorm and before
the addition; ``se_reduction`` (default 16) sets its hidden width C // r (see ``models.se``).
"""

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from torch import nn

from acon import ReLU, create_activation
from models.features import FeatureSpec
from models.se import DEFAULT_REDUCTION, check_reduction, resnet_se
from models.timm_api import TimmModelMixin

VARIANTS = ("official", "torchvision")
PLACEMENTS = ("paper", "all")
FIXED_RELU = functools.partial(ReLU, inplace=True)


class BasicBlock(nn.Module):
    """Two 3x3 convs; both activations are the injected ``act_layer``."""

    expansion = 1
    bn_act_pairs = (("bn1", "acon1"),)  # BatchNorm → activation pairs acon.fuse_bn_acon may fuse

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        act_layer: Callable[..., nn.Module],
        outer_act_layer: Callable[..., nn.Module],
        variant: str,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        bias = variant == "official"
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.acon1 = create_activation(act_layer, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = nn.Identity() if se_reduction is None else resnet_se(planes, se_reduction)
        self.downsample = downsample
        self.acon2 = create_activation(act_layer, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.se(self.bn2(self.conv2(self.acon1(self.bn1(self.conv1(x))))))
        return self.acon2(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck; ``acon`` (after the 3x3) is injected, ``act1``/``act3`` are outer."""

    expansion = 4
    bn_act_pairs = (("bn1", "act1"), ("bn2", "acon"))  # see BasicBlock

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        act_layer: Callable[..., nn.Module],
        outer_act_layer: Callable[..., nn.Module],
        variant: str,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        bias = variant == "official"
        s1, s3 = (stride, 1) if variant == "official" else (1, stride)
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, s1, 0, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = create_activation(outer_act_layer, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, s3, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.acon = create_activation(act_layer, planes)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, 1, 0, bias=bias)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.se = nn.Identity() if se_reduction is None else resnet_se(out_chs, se_reduction)
        self.downsample = downsample
        self.act3 = create_activation(outer_act_layer, out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.acon(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        out = self.se(self.bn3(self.conv3(out)))
        return self.act3(out + shortcut)


class ResNet(TimmModelMixin, nn.Module):
    """ResNet with an injected activation; see the module docstring for placement and variants."""

    __constants__ = ["features_only"]
    bn_act_pairs = (("bn1", "act1"),)  # the stem's; see BasicBlock

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        act_layer: Callable[..., nn.Module] = ReLU,
        num_classes: int = 1000,
        small_input: bool = False,
        act_placement: str = "paper",
        variant: str = "official",
        zero_init_residual: bool = False,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
        se: bool = False,
        se_reduction: int = DEFAULT_REDUCTION["resnet"],
    ) -> None:
        super().__init__()
        se_r = check_reduction(se_reduction) if se else None
        if variant not in VARIANTS:
            raise ValueError(f"ResNet variant={variant!r} is not one of {VARIANTS}")
        if act_placement not in PLACEMENTS:
            raise ValueError(f"ResNet act_placement={act_placement!r} is not one of {PLACEMENTS}")
        self.variant, self.act_placement, self.in_chans = variant, act_placement, in_chans
        outer = act_layer if act_placement == "all" else FIXED_RELU
        bias = variant == "official"
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=bias)
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=bias)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = create_activation(outer, 64)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_chs, specs = 64, [FeatureSpec("act1", 64, 1 if small_input else 2)]
        base = 1 if small_input else 4
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            out_chs = planes * block.expansion
            downsample = None
            if stride != 1 or in_chs != out_chs:
                downsample = nn.Sequential(
                    nn.Conv2d(in_chs, out_chs, 1, stride, 0, bias=bias), nn.BatchNorm2d(out_chs)
                )
            stage = [block(in_chs, planes, stride, downsample, act_layer, outer, variant, se_r)]
            stage += [
                block(out_chs, planes, 1, None, act_layer, outer, variant, se_r) for _ in range(1, blocks)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_chs = out_chs
            specs.append(FeatureSpec(f"layer{i + 1}", out_chs, base * 2**i))
        self.init_head(in_chs, num_classes, global_pool, drop_rate)
        self._initialize_weights(zero_init_residual)
        self.init_feature_info(specs, features_only, out_indices)

    def _initialize_weights(self, zero_init_residual: bool) -> None:
        """Authors' (torchvision) init: convs Kaiming-normal fan_out, BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _prune_for_features(self, last: int) -> None:
        """Drop the modules no selected feature map depends on (head, later stages)."""
        self.fc = None
        for i in range(max(last, 0) + 1, 5):
            setattr(self, f"layer{i}", None)

    def stages(self) -> list[nn.Module | None]:
        """The four residual stages, ``None`` where pruned."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stage_list(self) -> list[nn.Module]:
        """The modules after the max-pool, one per feature index 1-4."""
        return self.stages()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's output (feature index 0), before the max-pool."""
        return self.act1(self.bn1(self.conv1(x)))

    def drop_stages_after(self, index: int) -> None:
        """Replace the stages after feature index ``index`` by identities."""
        for i in range(max(index, 0) + 1, 5):
            setattr(self, f"layer{i}", nn.Identity())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups: the stem, then one group per stage (coarse) or per block."""
        return dict(stem=r"^conv1|^bn1|^act1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.unused
    def forward_feature_list(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps selected by ``out_indices`` (our own ``features_only`` output)."""
        wanted, out = set(self.feature_info.out_indices), []
        x = self.stem(x)
        if 0 in wanted:
            out.append(x)
        x = self.maxpool(x)
        for i, stage in enumerate(self.stages(), start=1):
            if stage is None:
                break
            x = stage(x)
            if i in wanted:
                out.append(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled output of the last stage."""
        x = self.maxpool(self.stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, dropout and the fully connected classifier."""
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_feature_list(x)
        return self.forward_head(self.forward_features(x))
