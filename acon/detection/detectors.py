"""torchvision's RetinaNet and Faster R-CNN with an FPN on any ``features_only`` backbone.

The body is one of our models built with ``features_only=True`` (ShuffleNetV2, ResNet, any activation),
a timm model with ``features_only=True``, or anything else with timm's ``feature_info.channels()`` and
``.reduction()``. Anchors follow the strides of the levels the body gives, so a body tapped at other
strides (or a small-input stem) gets anchors of the right size without a hand-written table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.features import FPNBackbone

DETECTORS = ("retinanet", "fasterrcnn")
ASPECT_RATIOS = (0.5, 1.0, 2.0)
DEFAULT_ANCHOR_SCALE = {"retinanet": 4.0, "fasterrcnn": 8.0}
"""Anchor size over stride at each level: torchvision's own choices (RetinaNet 32 px at P3, stride 8;
Faster R-CNN 32 px at P2, stride 4)."""


def level_strides(body: nn.Module, kind: str) -> list[int]:
    """The stride of every pyramid level the detector sees: the body's, then the FPN's extra levels."""
    info = getattr(body, "feature_info", None)
    if not callable(getattr(info, "reduction", None)):
        raise ValueError(f"{type(body).__name__} has no feature_info: build it with features_only=True")
    strides = [int(r) for r in info.reduction()]
    extra = 2 if kind == "retinanet" else 1  # P6, P7 | the max-pooled level
    return strides + [strides[-1] * 2 ** (k + 1) for k in range(extra)]


def anchor_generator(
    strides: Sequence[int], kind: str, anchor_scale: float | None = None, octaves: int | None = None
):
    """Anchors of ``anchor_scale × stride`` per level (RetinaNet: 3 octave scales per level)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    scale = DEFAULT_ANCHOR_SCALE[kind] if anchor_scale is None else float(anchor_scale)
    octaves = (3 if kind == "retinanet" else 1) if octaves is None else int(octaves)
    sizes = tuple(tuple(scale * s * 2 ** (k / octaves) for k in range(octaves)) for s in strides)
    return AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(strides))


def build_detector(
    kind: str,
    body: nn.Module,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    anchor_scale: float | None = None,
    **kwargs,
) -> nn.Module:
    """A torchvision ``RetinaNet`` or ``FasterRCNN`` (``kind``) on ``body`` behind an FPN.

    ``num_classes`` counts the background (categories + 1); images are resized so the short side is
    ``min_size`` (the long side at most ``max_size``) and normalised with ImageNet's mean and std inside
    the detector. Other keywords go to the torchvision class (e.g. ``detections_per_img``).
    """
    if kind not in DETECTORS:
        raise ValueError(f"detector {kind!r} is not one of {DETECTORS}")
    strides = level_strides(body, kind)
    anchors = anchor_generator(strides, kind, anchor_scale)
    common = dict(min_size=int(min_size), max_size=int(max_size), anchor_generator=anchors, **kwargs)
    backbone = FPNBackbone(body, out_channels=int(fpn_channels), extra_p6p7=kind == "retinanet")
    if kind == "retinanet":
        from torchvision.models.detection import RetinaNet

        net = RetinaNet(backbone, num_classes=num_classes, **common)
        heads = [net.head]
    else:
        from torchvision.models.detection import FasterRCNN
        from torchvision.ops import MultiScaleRoIAlign

        names = [str(i) for i in range(len(strides) - 1)]  # the body's levels; the pooled one is for the RPN
        roi_pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
        net = FasterRCNN(
            backbone,
            num_classes=num_classes,
            rpn_anchor_generator=common.pop("anchor_generator"),
            box_roi_pool=roi_pool,
            **common,
        )
        heads = [net.rpn.head, net.roi_heads.box_predictor]
    for head in heads:
        head.register_forward_hook(_float_outputs)
    return net


def _float_outputs(module: nn.Module, args, output):
    """A forward hook: the head's outputs in fp32, so boxes are decoded, and offset by class or level for
    NMS, in fp32 under bf16/fp16 autocast (in bf16 those offsets are 512 px apart near class 80, and NMS
    stops suppressing; Detectron2 likewise runs its NMS on float boxes). The convolutions stay in
    autocast's dtype."""
    if torch.is_tensor(output):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, dict):
        return type(output)((k, _float_outputs(module, args, v)) for k, v in output.items())
    if isinstance(output, list | tuple):
        return type(output)(_float_outputs(module, args, v) for v in output)
    return output
