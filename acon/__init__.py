"""acon: ACON activations (Ma et al., CVPR 2021) and the training suite built on them."""

from acon.activations import AconA, AconB, AconC, BatchNorm2dB1, MetaAconC, ReLU, Swish
from acon.convert import convert_activations
from acon.factory import ACTIVATIONS, create_activation, resolve_activation
from acon.frelu import AconFReLU, FReLU
from acon.fuse_bn import fuse_bn_acon, unfuse_bn_acon
from acon.params import activation_parameters, is_weight_decayed, param_groups

__all__ = [
    "fuse_bn_acon",
    "unfuse_bn_acon",
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
    "is_weight_decayed",
    "param_groups",
    "resolve_activation",
]
