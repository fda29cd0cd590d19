"""ACON-FReLU: ACON between the identity and the funnel condition of FReLU (Ma et al., ECCV 2020).

``S_β(η_a(x), η_b(x))`` with β fixed at 1, η_a the identity and η_b the "funnel" T(x) = BN(dwconv3x3(x)),
followed by a BatchNorm::

    y = bn2((η_a - η_b)·σ(η_a - η_b) + η_b)

The stride-2 form downsamples both terms: the funnel convolution has stride 2 and η_a max-pools x
(3x3, stride 2, padding 1). Parameter and buffer names (``conv_frelu``, ``bn1``, ``bn2``) are those of
the authors' TFNet release, so their checkpoints load key for key.
"""

from __future__ import annotations

import torch
from torch import nn

from acon.functional import check_channels

STRIDES = (1, 2)


def check_feature_maps(x: torch.Tensor, channels: int) -> None:
    """Raise a clear error unless ``x`` is (N, ``channels``, H, W)."""
    if x.dim() != 4:
        raise ValueError(
            f"AconFReLU needs (N, C, H, W) feature maps (its funnel is a 3x3 depthwise conv), "
            f"got shape {tuple(x.shape)}"
        )
    check_channels(x, channels)


class AconFReLU(nn.Module):
    """ACON-FReLU on (N, C, H, W) maps; ``stride=2`` halves H and W (max-pooled identity, strided funnel)."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"AconFReLU stride must be one of {STRIDES}, got {stride!r}")
        self.channels, self.stride = channels, stride
        self.conv_frelu = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=True)
        self.bn1 = nn.BatchNorm2d(channels)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript: the same computation without the input checks
            check_feature_maps(x, self.channels)
        funnel = self.bn1(self.conv_frelu(x))
        d = self.maxpool(x) - funnel
        return self.bn2(d * torch.sigmoid(d) + funnel)

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}"
