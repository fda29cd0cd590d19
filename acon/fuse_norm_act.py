"""timm's ``BatchNormAct2d``: BatchNorm, drop and activation in one module (EfficientNet, MobileNetV3,
RegNet, ...). After ``convert_activations`` its ``act`` is an ACON; with no drop-block (``drop`` is an
``nn.Identity``) the BatchNorm output goes only to that ACON, so the two fuse like any pair. The swap
changes the module's class to :class:`FusedBatchNormAct2d` (forward: the fused ACON on the input), which
keeps every parameter, buffer and state-dict key; ``restore`` undoes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import BatchNormAct2d
from torch import nn

Pair = tuple[nn.Module, nn.Module]


def norm_act_pairs(model: nn.Module, is_act: Callable[[nn.Module], bool]) -> list[Pair]:
    """``(module, module.act)`` for every plain ``BatchNormAct2d`` with no drop-block and an ACON ``act``."""
    return [
        (m, m.act)
        for m in model.modules()
        if type(m) is BatchNormAct2d and type(m.drop) is nn.Identity and is_act(m.act)
    ]


class FusedBatchNormAct2d(BatchNormAct2d):
    """``BatchNormAct2d`` whose ``act`` applies the BatchNorm itself (see :func:`acon.fuse_bn_acon`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


_NORM_ONLY = {BatchNormAct2d: nn.BatchNorm2d, FusedBatchNormAct2d: nn.BatchNorm2d}


def norm_forward(bn: nn.Module) -> Callable:
    """The forward that normalises only: ``nn.BatchNorm2d``'s for a ``BatchNormAct2d`` (timm's copies
    it), the module's own otherwise."""
    return _NORM_ONLY.get(type(bn), type(bn)).forward


def swap(bn: nn.Module) -> None:
    """Make a ``BatchNormAct2d`` run its (fused) ``act`` on the input."""
    bn.__class__ = FusedBatchNormAct2d


def restore(bn: nn.Module) -> bool:
    """Undo :func:`swap`; True when ``bn`` was swapped."""
    if type(bn) is not FusedBatchNormAct2d:
        return False
    bn.__class__ = BatchNormAct2d
    return True
