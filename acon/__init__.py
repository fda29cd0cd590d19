"""acon: ACON activations (Ma et al., CVPR 2021) and the training suite built on them.

The names below load on first use (PEP 562), so ``import acon.config_schema`` and the command lines'
key checks run without importing torch, timm or torchvision: a mistyped key is reported in about a
second instead of four.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SOURCES = {
    "AconA": "acon.activations",
    "AconB": "acon.activations",
    "AconC": "acon.activations",
    "BatchNorm2dB1": "acon.activations",
    "MetaAconC": "acon.activations",
    "ReLU": "acon.activations",
    "Swish": "acon.activations",
    "convert_activations": "acon.convert",
    "ACTIVATIONS": "acon.factory",
    "create_activation": "acon.factory",
    "resolve_activation": "acon.factory",
    "AconFReLU": "acon.frelu",
    "FReLU": "acon.frelu",
    "fuse_bn_acon": "acon.fuse_bn",
    "unfuse_bn_acon": "acon.fuse_bn",
    "activation_parameters": "acon.params",
    "is_weight_decayed": "acon.params",
    "param_groups": "acon.params",
}
__all__ = [
    "ACTIVATIONS",
    "AconA",
    "AconB",
    "AconC",
    "AconFReLU",
    "BatchNorm2dB1",
    "FReLU",
    "MetaAconC",
    "ReLU",
    "Swish",
    "activation_parameters",
    "convert_activations",
    "create_activation",
    "fuse_bn_acon",
    "is_weight_decayed",
    "param_groups",
    "resolve_activation",
    "unfuse_bn_acon",
]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use."""
    if name not in _SOURCES:
        raise AttributeError(f"module 'acon' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_SOURCES])


if TYPE_CHECKING:
    from acon.activations import AconA, AconB, AconC, BatchNorm2dB1, MetaAconC, ReLU, Swish
    from acon.convert import convert_activations
    from acon.factory import ACTIVATIONS, create_activation, resolve_activation
    from acon.frelu import AconFReLU, FReLU
    from acon.fuse_bn import fuse_bn_acon, unfuse_bn_acon
    from acon.params import activation_parameters, is_weight_decayed, param_groups
