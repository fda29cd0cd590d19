"""Segmentation's ops that have no deterministic CUDA kernel, and their deterministic forms.

Under ``deterministic=true`` (``torch.use_deterministic_algorithms(True)``) torch raises on CUDA for the
backward of ``F.interpolate`` (bilinear), of ``nn.AdaptiveAvgPool2d`` and for ``F.cross_entropy`` over
pixel maps (``nll_loss2d``). The classification head met the same wall with its global
pooling and solved it with ``mean``/``amax`` reductions (``models.timm_api.GlobalPool``); segmentation
does the same, so a run asked to be deterministic is deterministic rather than warned about:

- the final upsampling of the logits to the input size is bilinear interpolation written as two matmuls
  with the interpolation weights (``align_corners=False``, torch's own formula), whose backward is a
  matmul; it is chosen only while deterministic algorithms are on (the weights cost memory of size
  output × input per side, and the matmuls more time than the native kernel), and only where a
  backward follows (training steps: the forward alone is deterministic, so validation and the FLOP
  count in results.json keep the native op);
- DeepLabV3's image pooling branch (ASPP) pools with a mean over H and W and broadcasts its 1×1 result
  back (bilinear from 1×1 is that constant), always: the same numbers, faster, no parameters changed;
- the pixel loss treats the pixels as the rows of one batch (the classification loss, deterministic on
  CUDA) while deterministic algorithms are on: the same loss, at the cost of one copy of the logits.

State dicts, parameters and FLOPs are unchanged; outputs agree with the native ops to float rounding.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.segmentation.deeplabv3 import ASPPPooling, DeepLabV3
from torchvision.models.segmentation.fcn import FCN


def deterministic() -> bool:
    """True while ``torch.use_deterministic_algorithms`` is on (``deterministic=true``)."""
    return torch.are_deterministic_algorithms_enabled()


def bilinear_weights(n_out: int, n_in: int, device, dtype) -> torch.Tensor:
    """The (n_out, n_in) matrix of 1-D bilinear interpolation, ``align_corners=False`` (torch's source
    index ``(i + 0.5) · n_in / n_out - 0.5``, clamped at 0; the upper neighbour clamped at the edge)."""
    src = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(
        min=0
    )
    low = src.floor().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = (src - low)[:, None]
    cols = torch.arange(n_in, device=device, dtype=torch.float64)[None, :]
    weights = (1 - frac) * (cols == low[:, None]) + frac * (cols == high[:, None])
    return weights.to(dtype)


def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``; as two matmuls while
    deterministic algorithms are on and a backward will run (only the backward lacks a deterministic CUDA
    kernel: validation, and the FLOP count, keep the native op)."""
    if not (deterministic() and torch.is_grad_enabled() and x.requires_grad):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    h, w = int(size[0]), int(size[1])
    rows = bilinear_weights(h, x.shape[-2], x.device, x.dtype)
    cols = bilinear_weights(w, x.shape[-1], x.device, x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.t())


def pixel_cross_entropy(
    logits: torch.Tensor, masks: torch.Tensor, ignore_index: int, reduction: str, label_smoothing: float
) -> torch.Tensor:
    """``F.cross_entropy`` over (N, C, H, W) pixel maps; while deterministic algorithms are on, over the
    pixels as rows of a (N·H·W, C) batch (the classification loss, deterministic on CUDA, where the
    pixel-map kernel ``nll_loss2d`` is not), which is the same loss."""
    if deterministic():
        logits, masks = logits.movedim(1, -1).reshape(-1, logits.shape[1]), masks.reshape(-1)
    return F.cross_entropy(
        logits, masks, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


class MeanImagePooling(ASPPPooling):
    """DeepLabV3's image pooling branch with a mean over H and W and a broadcast back (the same numbers
    as adaptive average pooling to 1×1 and bilinear upsampling from it; a deterministic backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = x.mean(dim=(-2, -1), keepdim=True)
        for mod in list(self)[1:]:  # the conv, BatchNorm and ReLU after the pooling
            x = mod(x)
        return x.expand(*x.shape[:-2], *size)


def _forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    """torchvision's ``_SimpleSegmentationModel.forward`` with :func:`resize_bilinear`."""
    size = x.shape[-2:]
    features = self.backbone(x)
    result = OrderedDict(out=resize_bilinear(self.classifier(features["out"]), size))
    if self.aux_classifier is not None:
        result["aux"] = resize_bilinear(self.aux_classifier(features["aux"]), size)
    return result


class SegDeepLabV3(DeepLabV3):
    """torchvision's DeepLabV3, upsampling with :func:`resize_bilinear`."""

    forward = _forward


class SegFCN(FCN):
    """torchvision's FCN, upsampling with :func:`resize_bilinear`."""

    forward = _forward


def segmentation_model(head: str, backbone: nn.Module, classifier: nn.Module, aux: nn.Module | None):
    """The ``task.head`` network (``deeplabv3`` | ``fcn``) with the deterministic forms above."""
    for module in classifier.modules():
        if type(module) is ASPPPooling:
            module.__class__ = MeanImagePooling  # same submodules and state dict
    model_cls = SegDeepLabV3 if head == "deeplabv3" else SegFCN
    return model_cls(backbone, classifier, aux)
