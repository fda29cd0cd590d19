"""Detection backbones: a registered model's multi-scale features behind torchvision's FPN."""

from __future__ import annotations

from collections.abc import Sequence

from models.features import FPNBackbone
from models.registry import create_model


def build_fpn_backbone(
    name: str,
    activation="relu",
    out_indices: Sequence[int] = (2, 3, 4),
    out_channels: int = 256,
    extra_p6p7: bool = False,
    **kwargs,
) -> FPNBackbone:
    """``create_model(name, features_only=True)`` wrapped with an FPN, ready for torchvision detectors."""
    body = create_model(name, activation=activation, features_only=True, out_indices=out_indices, **kwargs)
    return FPNBackbone(body, out_channels=out_channels, extra_p6p7=extra_p6p7)
