"""Segmentation networks: torchvision's FCN and DeepLabV3 heads on a feature backbone (acon/tasks/backbone.py)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from omegaconf import DictConfig
from torch import nn

from acon.tasks.backbone import build_backbone

DEFAULT_OUT_INDICES = (-2, -1)  # aux head on the second-last map, main head on the last one


def default_out_indices(cfg: DictConfig) -> tuple[int, int]:
    """The last two feature maps of distinct strides: a last map at the same stride as the one before it
    (ShuffleNetV2's 1x1 ``conv_last``) adds no spatial detail and is left out. External models: (-2, -1)."""
    from acon.builders import EXTERNAL_ARCHS

    if cfg.model.arch in EXTERNAL_ARCHS:
        return DEFAULT_OUT_INDICES
    import models

    with torch.device("meta"):
        probe = models.create_model(cfg.model.arch, small_input=bool(cfg.model.small_input))
    info = getattr(probe, "feature_info", None)
    if not isinstance(info, list) or len(info) < 3:
        return DEFAULT_OUT_INDICES
    strides = [spec["reduction"] for spec in info]
    last = len(strides) - 1
    if strides[last] == strides[last - 1]:
        last -= 1
    return (last - 1, last)


class FeatureDict(nn.Module):
    """A ``features_only`` body returning torchvision's ``{"out": last map, "aux": second-last}``."""

    def __init__(self, body: nn.Module, with_aux: bool) -> None:
        super().__init__()
        self.body, self.with_aux = body, with_aux

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        out = OrderedDict(out=feats[-1])
        if self.with_aux:
            out["aux"] = feats[-2]
        return out


def build_segmentation_model(cfg: DictConfig) -> nn.Module:
    """``task.head`` (fcn | deeplabv3) on the ``model`` + ``activation`` backbone at ``task.output_stride``,
    with an FCN auxiliary head when ``task.aux_loss``; outputs ``{"out": logits at input size, ...}``."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    t, num_classes = cfg.task, int(cfg.data.num_classes)
    body = build_backbone(cfg, default_out_indices(cfg), t.output_stride)
    channels = body.feature_info.channels()
    if t.aux_loss and len(channels) < 2:
        raise ValueError(
            f"task.aux_loss=true needs two feature maps; backbone.out_indices gives {len(channels)}"
        )
    head = (
        DeepLabHead(channels[-1], num_classes)
        if t.head == "deeplabv3"
        else FCNHead(channels[-1], num_classes)
    )
    aux = FCNHead(channels[-2], num_classes) if t.aux_loss else None
    model_cls = DeepLabV3 if t.head == "deeplabv3" else FCN
    return model_cls(FeatureDict(body, bool(t.aux_loss)), head, aux)
