"""The one place in the project where a name becomes an activation module."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn

from acon.activations import AconA, AconB, AconC, MetaAconC, ReLU, Swish
from acon.frelu import AconFReLU

ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": ReLU,
    "swish": Swish,
    "acon_a": AconA,
    "acon_b": AconB,
    "acon_c": AconC,
    "meta_acon": MetaAconC,
    "acon_frelu": AconFReLU,
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


def create_activation(spec: ActivationSpec, channels: int, **kwargs) -> nn.Module:
    """Build the activation ``spec`` (name, class or functools.partial) for ``channels`` channels."""
    ctor = resolve_activation(spec)
    if _takes_channels(ctor):
        return ctor(channels, **kwargs)
    return ctor(**kwargs)
