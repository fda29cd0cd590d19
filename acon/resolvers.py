"""OmegaConf resolvers the configs use; registered on import (``acon.config_schema`` imports this module).

``${acon.small_input:${data.img_size}}`` and ``${acon.for_size:shufflenetv2_x0_5,${data.img_size}}``
let the default model follow the data: the stride-1 stem for inputs of at most ``SMALL_INPUT_MAX`` px,
the paper's stem above. ``${acon.conversion_tag:${.targets},${.init}}`` names a timm/torchvision
conversion that differs from the default (``+relu6``, ``+match``) so two conversions get two run dirs.
``${acon.detector_tag:${oc.select:task.detector,null}}`` does the same for a detector other than Faster
R-CNN (``-retinanet``), so the two detectors on one backbone get two run dirs.
"""

from __future__ import annotations

from omegaconf import OmegaConf

SMALL_INPUT_MAX = 64
"""The largest ``data.img_size`` (px) that gets the small-input (stride-1 stem) model by default."""


def small_input(img_size) -> bool:
    """True for inputs of at most ``SMALL_INPUT_MAX`` px (digits, CIFAR-style proxies)."""
    return int(img_size) <= SMALL_INPUT_MAX


def for_size(name: str, img_size) -> str:
    """``<name>_small`` for small inputs, else ``name`` (the model config that fits the data)."""
    return f"{name}_small" if small_input(img_size) else str(name)


def conversion_tag(targets, init) -> str:
    """``""`` for the default conversion (ReLU and SiLU, init=default), else ``+<targets>`` / ``+match``."""
    from acon.convert import DEFAULT_TARGETS, resolve_targets

    names = resolve_targets(list(targets) if targets else None)
    tag = "" if sorted(names) == sorted(DEFAULT_TARGETS) else "+" + "-".join(names)
    return tag + ("" if init in (None, "default") else f"+{init}")


def detector_tag(detector) -> str:
    """``""`` outside detection and for Faster R-CNN (its run dirs keep their names), else ``-<detector>``."""
    return "" if detector in (None, "", "fasterrcnn") else f"-{detector}"


def register() -> None:
    """Register the resolvers once (idempotent)."""
    for name, fn in (
        ("acon.small_input", small_input),
        ("acon.for_size", for_size),
        ("acon.conversion_tag", conversion_tag),
        ("acon.detector_tag", detector_tag),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
