"""acon: ACON activations (Ma et al., CVPR 2021) and the training suite built on them."""

from acon.activations import AconA, AconB, AconC, BatchNorm2dB1, MetaAconC, ReLU, Swish
from acon.convert import convert_activations
from acon.factory import ACTIVATIONS, create_activation, resolve_activation
from acon.frelu import AconFReLU, FReLU
from acon.params import activation_parameters, is_weight_decayed, param_groups

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
    "is_weight_decayed",
    "param_groups",
    "resolve_activation",
]
