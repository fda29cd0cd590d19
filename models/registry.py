"""Model registry: ``create_model(name, activation=...)`` for every network of the paper's table."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from acon import MetaAconC, resolve_activation
from acon.factory import ActivationSpec
from models.mobilenet import MobileNetV1, MobileNetV2
from models.resnet import BasicBlock, Bottleneck, ResNet
from models.shufflenetv2 import WIDTHS, ShuffleNetV2
from models.tfnet import WIDTHS as TFNET_WIDTHS
from models.tfnet import TFNet


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its family, constructor, fixed config, Meta-ACON reduction ``r`` and the
    activation ``create_model`` uses when none is given."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    config: dict = field(default_factory=dict)
    meta_acon_r: int = 16
    default_activation: str = "relu"


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


MOBILENETV2_WIDTHS = (0.17, 0.6, 1.0, 1.4)


def _width_name(prefix: str, width: float) -> str:
    """``tfnet`` and 0.5 -> ``tfnet_x0_5`` (the ShuffleNetV2 naming)."""
    return f"{prefix}_x{str(width).replace('.', '_')}"


def _lightweight_entries() -> list[ModelEntry]:
    """TFNet (default activation ACON-FReLU) and the MobileNet baselines of the TFNet table / abstract."""
    out = [
        ModelEntry(_width_name("tfnet", w), "tfnet", TFNet, {"width": w}, 16, "acon_frelu")
        for w in TFNET_WIDTHS
    ]
    out += [
        ModelEntry(_width_name("mobilenetv2", w), "mobilenetv2", MobileNetV2, {"width": w})
        for w in MOBILENETV2_WIDTHS
    ]
    out.append(ModelEntry(_width_name("mobilenetv1", 0.25), "mobilenetv1", MobileNetV1, {"width": 0.25}))
    return out


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in _shufflenet_entries()
    + [ModelEntry(n, "resnet", ResNet, {"block": b, "layers": ly}) for n, (b, ly) in _RESNET_LAYERS.items()]
    + _lightweight_entries()
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


OVERRIDABLE = ("drop_rate",)
"""Entry config values a caller may override (ShuffleNetV2 2.0x's default dropout, for instance)."""


def _model_kwargs(entry: ModelEntry) -> list[str]:
    params = inspect.signature(entry.builder).parameters
    return [k for k in params if (k not in entry.config or k in OVERRIDABLE) and k != "act_layer"]


def create_model(
    name: str,
    activation: ActivationSpec | None = None,
    num_classes: int = 1000,
    small_input: bool = False,
    act_kwargs: dict | None = None,
    **kwargs,
) -> nn.Module:
    """Build ``name`` with ``activation`` (a name, class or partial for ``acon.create_activation``; None:
    the model's own, ReLU except for TFNet's ACON-FReLU).

    ``act_kwargs`` are bound to the activation (e.g. ``{"r": 4}`` or ``{"impl": "reference"}``).
    Family options: ShuffleNetV2 ``variant="official"|"megvii"``, ``drop_rate``; ResNet
    ``variant="official"|"torchvision"``, ``act_placement="paper"|"all"``, ``zero_init_residual``;
    both ``in_chans``, ``features_only``, ``out_indices``, ``se`` and ``se_reduction`` (squeeze-excite).
    TFNet: ``drop_rate``, ``in_chans``, ``features_only``, ``out_indices``; MobileNet: ``drop_rate``,
    ``in_chans``. Every family: ``global_pool`` (timm's pooling names).
    """
    entry = get_entry(name)
    valid = _model_kwargs(entry)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        valid = ["activation", "act_kwargs", *valid]
        raise TypeError(f"create_model({name!r}): unknown keyword argument(s) {unknown}; valid: {valid}")
    activation = entry.default_activation if activation is None else activation
    act_layer = model_activation(activation, entry.meta_acon_r, act_kwargs)
    config = {**entry.config, **kwargs}
    model = entry.builder(**config, act_layer=act_layer, num_classes=num_classes, small_input=small_input)
    model.model_name = name
    return model
