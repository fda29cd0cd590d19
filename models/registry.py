"""Model registry: ``create_model(name, activation=...)`` for every network of the paper's table."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from acon import MetaAconC, resolve_activation
from acon.factory import ActivationSpec
from models.resnet import BasicBlock, Bottleneck, ResNet
from models.shufflenetv2 import WIDTHS, ShuffleNetV2


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its family, constructor, fixed config and Meta-ACON reduction ``r``."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    config: dict = field(default_factory=dict)
    meta_acon_r: int = 16


def _shufflenet_entries() -> list[ModelEntry]:
    out = []
    for width, channels in WIDTHS.items():
        name = "shufflenetv2_x" + width[:-1].replace(".", "_")
        cfg = {"channels": channels, "drop_rate": 0.2 if width == "2.0x" else 0.0}
        out.append(ModelEntry(name, "shufflenetv2", ShuffleNetV2, cfg, 8 if width == "0.5x" else 16))
    return out


_RESNET_LAYERS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}

MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in _shufflenet_entries()
    + [ModelEntry(n, "resnet", ResNet, {"block": b, "layers": ly}) for n, (b, ly) in _RESNET_LAYERS.items()]
}


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return list(MODELS)


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; unknown names raise with the valid list."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[name]


def _is_meta_acon(ctor: Callable) -> bool:
    target = ctor.func if isinstance(ctor, functools.partial) else ctor
    return isinstance(target, type) and issubclass(target, MetaAconC)


def model_activation(
    activation: ActivationSpec, meta_acon_r: int = 16, act_kwargs: dict | None = None
) -> Callable[..., nn.Module]:
    """Resolve ``activation`` to a constructor, bind ``act_kwargs``, and give Meta-ACON the model's ``r``.

    An ``r`` given by the user (in ``act_kwargs`` or in a ``functools.partial``) wins over the default.
    """
    ctor = resolve_activation(activation)
    if act_kwargs:
        ctor = functools.partial(ctor, **act_kwargs)
    if _is_meta_acon(ctor) and "r" not in getattr(ctor, "keywords", {}):
        ctor = functools.partial(ctor, r=meta_acon_r)
    return ctor


def _model_kwargs(entry: ModelEntry) -> list[str]:
    params = inspect.signature(entry.builder).parameters
    return [k for k in params if k not in entry.config and k != "act_layer"]


def create_model(
    name: str,
    activation: ActivationSpec = "relu",
    num_classes: int = 1000,
    small_input: bool = False,
    act_kwargs: dict | None = None,
    **kwargs,
) -> nn.Module:
    """Build ``name`` with ``activation`` (a name, class or partial for ``acon.create_activation``).

    ``act_kwargs`` are bound to the activation (e.g. ``{"r": 4}`` or ``{"impl": "reference"}``).
    Family options: ShuffleNetV2 ``variant="official"|"megvii"``, ``drop_rate``; ResNet
    ``variant="official"|"torchvision"``, ``act_placement="paper"|"all"``, ``zero_init_residual``;
    both ``in_chans``, ``features_only``, ``out_indices``.
    """
    entry = get_entry(name)
    valid = _model_kwargs(entry)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"create_model({name!r}): unknown keyword argument(s) {unknown}; valid: {valid}")
    act_layer = model_activation(activation, entry.meta_acon_r, act_kwargs)
    model = entry.builder(
        **entry.config, act_layer=act_layer, num_classes=num_classes, small_input=small_input, **kwargs
    )
    model.model_name = name
    return model
