"""Segmentation networks: torchvision's FCN and DeepLabV3 heads on a feature backbone (acon/tasks/backbone.py)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from omegaconf import DictConfig
from torch import nn

from acon.tasks.backbone import build_backbone, default_out_indices

SEG_FEATURE_MAPS = 2  # aux head on the second-last distinct-stride map, main head on the last one


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


def build_segmentation_model(cfg: DictConfig, load_backbone: bool | None = None) -> nn.Module:
    """``task.head`` (fcn | deeplabv3) on the ``model`` + ``activation`` backbone at ``task.output_stride``,
    with an FCN auxiliary head when ``task.aux_loss``; outputs ``{"out": logits at input size, ...}``."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    from torchvision.models.segmentation.fcn import FCNHead

    from acon.tasks.segmentation_deterministic import segmentation_model

    t, num_classes = cfg.task, int(cfg.data.num_classes)
    body = build_backbone(
        cfg, default_out_indices(cfg, SEG_FEATURE_MAPS), t.output_stride, load_checkpoint=load_backbone
    )
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
    return segmentation_model(t.head, FeatureDict(body, bool(t.aux_loss)), head, aux)  # deterministic-ready
