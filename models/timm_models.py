"""The zoo as timm models: ``acon_<name>`` built by timm's ``build_model_with_cfg``, with pretrained cfgs.

``import models.timm_models`` registers every model of ``models.registry`` whose family is in
``FAMILIES`` (timm's own models stay untouched)::

    timm.create_model("acon_resnet50")                           # ACON-C (the default activation)
    timm.create_model("acon_tfnet_x0_5")                         # TFNet's own default: ACON-FReLU
    timm.create_model("acon_resnet50", activation="meta_acon", num_classes=10, features_only=True)
    timm.create_model("acon_resnet50.megvii_meta_in1k", pretrained=True,
                      pretrained_cfg_overlay=dict(file="ResNet50+MetaACON.pth.tar"))

Every keyword of ``models.create_model`` is accepted (``activation``, ``act_kwargs``, ``variant``,
``small_input``, ...), plus timm's ``device``/``dtype``; unknown ones raise ``TypeError``.

Pretrained tags name the authors' checkpoint layouts: ``megvii_in1k`` (ACON-C) and ``megvii_meta_in1k``
(Meta-ACON) for the models of the paper's ACON tables, ``megvii_in1k`` (ACON-FReLU) for the four
released TFNets. No URL is known, so the file is given with
``pretrained_cfg_overlay=dict(file=PATH)``; it is converted on load by ``models.official`` (timm's
``pretrained_filter_fn``). Those weights were trained on BGR input in 0-255 without normalisation. The
cfg records the 0-255 scale as ``mean=0, std=1/255`` (what ``timm.data.create_transform`` can express);
the channel order, which timm's transforms cannot flip, is handled once in the weights: the filter
reverses the first convolution's input channels, so the loaded model takes RGB. ``eval.py`` instead
keeps the weights as released and feeds BGR (``data.preprocess=bgr_255``); both give the same logits.

The ACON modules are FX leaves (``register_notrace_module``): their fused op is an autograd.Function
that FX cannot trace into. Under TorchScript they take the reference (paper-form) path. ACON-FReLU is
a leaf too (its input checks branch on shapes); it has no fused op, and under TorchScript it skips only
those checks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_module
from timm.models._builder import resolve_pretrained_cfg
from torch import nn

from acon import AconFReLU
from acon.activations import ACON_MODULES
from models.official import OFFICIAL_INPUT, convert_official_state_dict
from models.registry import MODELS, create_model

PREFIX = "acon_"
DEFAULT_ACTIVATION = "acon_c"
PAPER_URL = "https://arxiv.org/abs/2009.04759"
AUTHORS_CODE = "https://github.com/nmaac/acon"


@dataclass(frozen=True)
class TimmFamily:
    """How a family of ``models.registry`` meets timm: first conv, classifier, feature wrapper config, and
    the activation of its untagged ``acon_*`` models."""

    first_conv: str
    classifier: str
    feature_cfg: dict = field(default_factory=lambda: {"flatten_sequential": True})
    default_activation: str = DEFAULT_ACTIVATION


FAMILIES: dict[str, TimmFamily] = {
    "shufflenetv2": TimmFamily("first_conv.0", "classifier.0"),
    "resnet": TimmFamily("conv1", "fc", {}),
    "tfnet": TimmFamily("first_conv.0", "classifier.0", default_activation="acon_frelu"),
    "mobilenetv2": TimmFamily("features.0.0", "classifier"),
    "mobilenetv1": TimmFamily("features.0.0", "classifier"),
}
"""One row per family registered with timm (every family of ``models.registry``)."""

_ACON_TABLE_TAGS = {"megvii_in1k": "acon_c", "megvii_meta_in1k": "meta_acon"}
PRETRAINED_TAGS: dict[str, dict[str, str]] = {
    **{
        name: _ACON_TABLE_TAGS
        for name in ("shufflenetv2_x0_5", "shufflenetv2_x1_5", "resnet50", "resnet101", "resnet152")
    },
    **{f"tfnet_x{w}": {"megvii_in1k": "acon_frelu"} for w in ("0_5", "1_0", "1_5", "2_0")},
}
"""The authors' checkpoint layouts per model, each tag with the activation its weights were trained with:
the paper's ACON-C and Meta-ACON table rows, and the released TFNets (ACON-FReLU)."""


def tag_activation(name: str, tag: str | None) -> str:
    """The activation ``acon_<name>.<tag>`` is built with (the family's default without a tag)."""
    if tag:
        return PRETRAINED_TAGS[name][tag]
    return FAMILIES[MODELS[name].family].default_activation


for _module in (*ACON_MODULES, AconFReLU):
    register_notrace_module(_module)


def _cfg(family: TimmFamily, tag: str, activation: str) -> dict:
    cfg = dict(
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,  # resize 256, centre crop 224: acon.data.transforms.val_transform
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv=family.first_conv,
        classifier=family.classifier,
        paper_ids=PAPER_URL,
        origin_url=AUTHORS_CODE,
    )
    if tag:
        scale = OFFICIAL_INPUT["scale"]
        cfg.update(
            mean=tuple(OFFICIAL_INPUT["mean"]),
            std=(1.0 / scale,) * 3,
            notes=(
                f"authors' checkpoint ({activation}): trained on BGR input in 0-255 without "
                "normalisation; mean=0, std=1/255 give the 0-255 scale, and the checkpoint filter reverses "
                "the first conv's input channels so the loaded model takes RGB",
            ),
        )
    return cfg


def official_filter(state_dict: Mapping, model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: the authors' layout converted by ``models.official``, RGB stem.

    The file is checked key by key against the architecture it was released for (1000 classes, 3 input
    channels); timm then adapts the classifier and ``in_chans`` as for its own weights."""
    build = model.acon_build
    sd = convert_official_state_dict(state_dict, build["name"], build["activation"], **build["kwargs"])
    first = model.pretrained_cfg["first_conv"] + ".weight"
    sd[first] = sd[first].flip(1)  # BGR -> RGB
    return dict(sd)


_STATELESS = ("num_classes", "in_chans", "drop_rate", "global_pool")


def _build(name: str, device=None, dtype: torch.dtype | None = None, **kwargs) -> nn.Module:
    with torch.device(device) if device is not None else nullcontext():
        model = create_model(name, **kwargs)
    if dtype is not None:
        model.to(dtype)
    arch = {k: v for k, v in kwargs.items() if k not in _STATELESS and k != "activation"}
    model.acon_build = {"name": name, "activation": kwargs.get("activation", "relu"), "kwargs": arch}
    return model


def create(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build ``name`` through timm's ``build_model_with_cfg`` (the body of every ``acon_*`` entrypoint)."""
    variant = PREFIX + name
    cfg = resolve_pretrained_cfg(
        variant, kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")
    )
    tags = ", ".join(f"{variant}.{t}" for t in PRETRAINED_TAGS.get(name, ())) or "none"
    if pretrained and not cfg.has_weights:
        raise ValueError(
            f"{variant}: no hosted weights; pass the authors' checkpoint file with a pretrained tag "
            f"(tags: {tags}) and pretrained_cfg_overlay=dict(file=PATH)"
        )
    kwargs.setdefault("activation", tag_activation(name, cfg.tag))
    family = FAMILIES[MODELS[name].family]
    return build_model_with_cfg(
        functools.partial(_build, name),
        variant,
        pretrained,
        feature_cfg=dict(family.feature_cfg),
        pretrained_filter_fn=official_filter,
        **kwargs,
    )


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return create(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = PREFIX + name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f"{name} from the acon-suite model zoo (see models.create_model and models.timm_models)."
    )
    return entrypoint


def register_family(family: str) -> list[str]:
    """Register every model of ``family`` (a row of ``FAMILIES``) with timm; returns the timm names."""
    names = [n for n, entry in MODELS.items() if entry.family == family]
    cfgs = {}
    for n in names:
        for tag in ("", *PRETRAINED_TAGS.get(n, ())):
            variant = PREFIX + n + (f".{tag}" if tag else "")
            cfgs[variant] = _cfg(FAMILIES[family], tag, tag_activation(n, tag))
    globals()["default_cfgs"] = {**globals().get("default_cfgs", {}), **generate_default_cfgs(cfgs)}
    return [register_model(_entrypoint(n)).__name__ for n in names]


TIMM_NAMES: list[str] = [t for family in FAMILIES for t in register_family(family)]
