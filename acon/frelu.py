"""FReLU and ACON-FReLU: activations on the funnel condition of Ma et al. (ECCV 2020).

The funnel condition is T(x) = BN(dwconv3x3(x)), a per-pixel spatial context. FReLU takes
``max(x, T(x))``; ACON-FReLU replaces the maximum by ACON's smooth maximum ``S_β(η_a(x), η_b(x))`` with
β fixed at 1, η_a the identity and η_b the funnel, followed by a BatchNorm::

    y = bn2((η_a - η_b)·σ(η_a - η_b) + η_b)

The stride-2 form (TFNet's downsampling sites) downsamples both terms: the funnel convolution has stride 2
and the identity is max-pooled (3x3, stride 2, padding 1). Parameter and buffer names (``conv_frelu``,
``bn1``, ``bn2``) are those of the authors' TFNet release, so their checkpoints load key for key; FReLU
shares ``conv_frelu`` and ``bn1`` (the FReLU release calls its BatchNorm ``bn_frelu``).
"""

from __future__ import annotations

import torch
from torch import nn

from acon.functional import check_channels

STRIDES = (1, 2)


def check_feature_maps(x: torch.Tensor, channels: int, owner: str = "AconFReLU") -> None:
    """Raise a clear error unless ``x`` is (N, ``channels``, H, W)."""
    if x.dim() != 4:
        raise ValueError(
            f"{owner} needs (N, C, H, W) feature maps (its funnel is a 3x3 depthwise conv), "
            f"got shape {tuple(x.shape)}"
        )
    check_channels(x, channels)


class FReLU(nn.Module):
    """FReLU ``max(x, BN(dwconv3x3(x)))`` on (N, C, H, W) maps; ``stride=2`` halves H and W."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"{type(self).__name__} stride must be one of {STRIDES}, got {stride!r}")
        self.channels, self.stride = channels, stride
        self.conv_frelu = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=True)
        self.bn1 = nn.BatchNorm2d(channels)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def funnel(self, x: torch.Tensor) -> torch.Tensor:
        """The funnel condition T(x) = BN(dwconv3x3(x)) (strided at a stride-2 site)."""
        if not torch.jit.is_scripting():  # TorchScript: the same computation without the input checks
            check_feature_maps(x, self.channels, type(self).__name__)
        return self.bn1(self.conv_frelu(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(self.maxpool(x), self.funnel(x))

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}"


class AconFReLU(FReLU):
    """ACON-FReLU on (N, C, H, W) maps; ``stride=2`` halves H and W (max-pooled identity, strided funnel)."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__(channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        funnel = self.funnel(x)
        d = self.maxpool(x) - funnel
        return self.bn2(d * torch.sigmoid(d) + funnel)
