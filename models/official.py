"""Import of the authors' released checkpoints (ShuffleNetV2 / ResNet with ReLU, ACON-C, Meta-ACON;
TFNet with ACON-FReLU).

The released files are ``{'state_dict': ...}`` saved from ``nn.DataParallel`` (keys start with
``module.``). Our modules use the authors' names (see ``models.shufflenetv2``, ``models.resnet`` and
``models.tfnet``), so conversion is: unwrap, strip the prefix, and validate every key and shape against
the target model, listing whatever is unknown, missing or mis-shaped.

The authors trained and evaluated on BGR images in 0-255 with no mean/std normalisation
(``OFFICIAL_INPUT``); a converted model needs that preprocessing at evaluation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from models.registry import create_model

OFFICIAL_INPUT = {"channel_order": "BGR", "scale": 255.0, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
_OPTIONAL_SUFFIXES = (".num_batches_tracked",)  # absent from checkpoints saved by older PyTorch
_PREFIXES = ("module.",)
_SHOW = 12


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Take ``checkpoint['state_dict']`` if present and strip DataParallel's ``module.`` prefix."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a state dict or {{'state_dict': ...}}, got {type(checkpoint).__name__}")
    sd = checkpoint.get("state_dict", checkpoint)
    if not isinstance(sd, Mapping):
        raise TypeError(f"checkpoint['state_dict'] is a {type(sd).__name__}, not a mapping")
    out = {}
    for key, value in sd.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key in out:
            raise ValueError(f"key {key!r} appears both with and without the 'module.' prefix")
        out[key] = value
    return out


def infer_official_activation(checkpoint: Mapping) -> str:
    """Guess the activation a released checkpoint was trained with from its parameter names."""
    keys = unwrap_state_dict(checkpoint).keys()
    if any(k.endswith(".conv_frelu.weight") for k in keys):
        return "acon_frelu"
    if any(k.endswith(".fc1.weight") for k in keys):
        return "meta_acon"
    if any(k.endswith(".p1") for k in keys):
        return "acon_c"
    if any(k.endswith(".beta") for k in keys):
        return "swish"
    return "relu"


def _listing(what: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW]) + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")
    return f"{len(keys)} {what} key(s): {shown}"


def _hint(unknown: list[str], missing: list[str]) -> str:
    if missing and all(k.endswith(".bias") for k in missing) and not unknown:
        return " (no conv biases in the checkpoint: try variant='megvii' or variant='torchvision')"
    if any(k.rsplit(".", 1)[-1] in ("p1", "p2", "beta") for k in unknown + missing):
        return " (activation parameters differ: check the activation, e.g. with infer_official_activation)"
    return ""


def convert_official_state_dict(
    state_dict: Mapping, name: str, activation="relu", **model_kwargs
) -> OrderedDict[str, torch.Tensor]:
    """Map an authors' checkpoint onto ``create_model(name, activation, **model_kwargs)``'s state dict.

    Raises ``KeyError`` listing unknown and missing keys, ``ValueError`` listing shape mismatches.
    """
    src = unwrap_state_dict(state_dict)
    with torch.device("meta"):
        target: nn.Module = create_model(name, activation=activation, **model_kwargs)
    expected = target.state_dict()
    unknown = sorted(k for k in src if k not in expected)
    missing = sorted(k for k in expected if k not in src and not k.endswith(_OPTIONAL_SUFFIXES))
    if unknown or missing:
        parts = [_listing(w, ks) for w, ks in (("unknown", unknown), ("missing", missing)) if ks]
        where = f"{name} with activation={activation!r}"
        raise KeyError(f"checkpoint does not match {where}: {'; '.join(parts)}{_hint(unknown, missing)}")
    bad = [
        f"{k}: checkpoint {tuple(src[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in src and tuple(src[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise ValueError(f"{len(bad)} shape mismatch(es) for {name}: " + "; ".join(bad[:_SHOW]))
    out = OrderedDict()
    for k, v in expected.items():
        out[k] = src[k] if k in src else torch.zeros((), dtype=v.dtype)
    return out


def load_official_checkpoint(
    path: str, name: str, activation: str | None = None, **model_kwargs
) -> nn.Module:
    """Build ``name`` and load the authors' checkpoint at ``path`` (activation inferred if not given)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    activation = activation or infer_official_activation(checkpoint)
    model = create_model(name, activation=activation, **model_kwargs)
    model.load_state_dict(convert_official_state_dict(checkpoint, name, activation, **model_kwargs))
    return model
