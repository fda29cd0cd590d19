"""The one place in the project where a name becomes an activation module."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from timm.layers import create_act_layer, get_act_layer
from torch import nn

from acon.activations import AconA, AconB, AconC, MetaAconC, ReLU, Swish
from acon.frelu import AconFReLU, FReLU


def channel_prelu(channels: int, init: float = 0.25) -> nn.PReLU:
    """PReLU with one learnable slope per channel (timm's ``nn.PReLU`` with ``num_parameters=channels``)."""
    return create_act_layer("prelu", num_parameters=channels, init=init)


TIMM_ACTIVATIONS = ("gelu", "mish", "hard_swish", "silu", "celu")
"""Parameter-free activations built by ``timm.layers.create_act_layer`` under these names."""

ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": ReLU,
    "swish": Swish,
    "acon_a": AconA,
    "acon_b": AconB,
    "acon_c": AconC,
    "meta_acon": MetaAconC,
    "acon_frelu": AconFReLU,
    **{name: functools.partial(create_act_layer, name) for name in TIMM_ACTIVATIONS},
    "prelu": channel_prelu,
    "frelu": FReLU,
}

ActivationSpec = str | type | functools.partial | Callable[..., nn.Module]


def _takes_channels(fn: Callable) -> bool:
    target = fn.func if isinstance(fn, functools.partial) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "channels" in params


def resolve_activation(spec: ActivationSpec) -> Callable[..., nn.Module]:
    """Turn a name, class or partial into a constructor; unknown names raise with the valid list."""
    if isinstance(spec, str):
        key = spec.lower().replace("-", "_")
        if key not in ACTIVATIONS:
            raise ValueError(f"unknown activation {spec!r}; valid names: {', '.join(sorted(ACTIVATIONS))}")
        return ACTIVATIONS[key]
    if isinstance(spec, nn.Module):
        raise TypeError(
            f"activation must be a name, class or partial (a constructor called once per layer), "
            f"got the module instance {spec!r}"
        )
    if callable(spec):
        return spec
    raise TypeError(f"activation must be a name, class or partial, got {type(spec).__name__}")


def activation_label(spec: ActivationSpec) -> str:
    """A readable name for ``spec``: the class it builds (``GELU`` for timm's ``create_act_layer("gelu")``)."""
    if isinstance(spec, str):
        return spec
    target = getattr(spec, "func", spec)
    if target is channel_prelu:
        return "PReLU"
    if target is create_act_layer:
        name = spec.args[0] if spec.args else spec.keywords.get("name")
        return getattr(get_act_layer(name), "__name__", str(name))
    return getattr(target, "__name__", None) or str(spec)


def create_activation(spec: ActivationSpec, channels: int, **kwargs) -> nn.Module:
    """Build the activation ``spec`` (name, class or functools.partial) for ``channels`` channels."""
    ctor = resolve_activation(spec)
    if _takes_channels(ctor):
        return ctor(channels, **kwargs)
    return ctor(**kwargs)
