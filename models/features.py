"""Multi-scale feature extraction in timm's ``features_only`` / ``out_indices`` convention."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureSpec:
    """One tap point of a backbone: module name, channel count and stride w.r.t. the input."""

    module: str
    num_chs: int
    reduction: int


class FeatureInfo:
    """The selected tap points of a ``features_only`` model, with timm's accessor names."""

    def __init__(self, specs: Sequence[FeatureSpec], out_indices: Sequence[int]) -> None:
        self.specs = tuple(specs)
        self.out_indices = check_out_indices(out_indices, len(self.specs))

    def _get(self, field: str, idx: int | Sequence[int] | None):
        picked = [getattr(self.specs[i], field) for i in self.out_indices]
        if idx is None:
            return picked
        if isinstance(idx, int):
            return picked[idx]
        return [picked[i] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None):
        """Channel count of each selected feature map (or of the ``idx``-th one)."""
        return self._get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        """Stride of each selected feature map relative to the input."""
        return self._get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        """Name of the module whose output is each selected feature map."""
        return self._get("module", idx)

    def get_dicts(self) -> list[dict]:
        """timm-style list of ``{'module', 'num_chs', 'reduction'}`` dicts for the selected features."""
        return [dict(vars(self.specs[i])) for i in self.out_indices]

    def __len__(self) -> int:
        return len(self.out_indices)

    def __getitem__(self, i: int) -> dict:
        return self.get_dicts()[i]


def check_out_indices(out_indices: Sequence[int], num_features: int) -> tuple[int, ...]:
    """Validate ``out_indices`` (sorted, unique, in range); negative indices count from the end."""
    if isinstance(out_indices, int):
        out_indices = (out_indices,)
    idx = tuple(i + num_features if i < 0 else i for i in out_indices)
    bad = [i for i in out_indices if not -num_features <= i < num_features]
    if bad or not idx:
        raise ValueError(f"out_indices={tuple(out_indices)} invalid: need indices in [0, {num_features})")
    if list(idx) != sorted(set(idx)):
        raise ValueError(f"out_indices={tuple(out_indices)} must be strictly increasing")
    return idx


class FPNBackbone(nn.Module):
    """A ``features_only`` model followed by torchvision's FeaturePyramidNetwork, for detection heads.

    Returns an ``OrderedDict`` of feature maps, and exposes ``out_channels`` as torchvision's detection
    models expect. ``extra_p6p7`` appends two stride-2 levels (RetinaNet), otherwise one max-pooled level.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, extra_p6p7: bool = False) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

        if not callable(getattr(getattr(body, "feature_info", None), "channels", None)):
            raise ValueError(f"{type(body).__name__} has no feature_info: build it with features_only=True")
        extra = LastLevelP6P7(out_channels, out_channels) if extra_p6p7 else LastLevelMaxPool()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
