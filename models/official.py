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

import re
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from models.registry import create_model, get_entry, list_models

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


def _resnet_stage_blocks(keys) -> tuple[int, ...] | None:
    """Blocks per ResNet stage (layer1..layer4) read from parameter names; None for a non-ResNet."""
    blocks: dict[int, int] = {}
    for key in keys:
        m = re.match(r"layer(\d)\.(\d+)\.", key)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    return tuple(blocks.get(i, 0) for i in range(1, 5)) if blocks else None


def _candidate_models(keys) -> list[str]:
    """Registered models that could have these parameter names (ResNets by their blocks per stage)."""
    blocks = _resnet_stage_blocks(keys)
    if blocks is None:
        return [n for n in list_models() if get_entry(n).family == "shufflenetv2"]
    return [
        n
        for n in list_models()
        if get_entry(n).family == "resnet" and get_entry(n).config["layers"] == blocks
    ]


def _classifier(model: nn.Module) -> str | None:
    """Name of the model's last linear layer (its classifier), if any."""
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return heads[-1] if heads else None


def official_num_classes(checkpoint: Mapping, name: str) -> int | None:
    """The number of classes of a released checkpoint's classifier, for model ``name`` (None if absent)."""
    with torch.device("meta"):
        head = _classifier(create_model(name))
    weight = unwrap_state_dict(checkpoint).get(f"{head}.weight")
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _same_architecture(src: Mapping[str, torch.Tensor], target: nn.Module) -> bool:
    """Same weight names and shapes, up to biases (which only the variant decides) and the class count."""
    expected = target.state_dict()
    head = _classifier(target)
    skip = (".bias", *_OPTIONAL_SUFFIXES)
    names = {k for k in expected if not k.endswith(skip)}
    if names != {k for k in src if not k.endswith(skip)}:
        return False
    for k in names:
        got, want = tuple(src[k].shape), tuple(expected[k].shape)
        if got != want and not (k == f"{head}.weight" and got[1:] == want[1:]):
            return False
    return True


def identify_architecture(checkpoint: Mapping) -> tuple[str, str] | None:
    """(model name, activation) whose parameter names and shapes a released checkpoint has, or None."""
    src = unwrap_state_dict(checkpoint)
    activation = infer_official_activation(src)
    for name in _candidate_models(src):
        with torch.device("meta"):
            target = create_model(name, activation=activation)
        if _same_architecture(src, target):
            return name, activation
    return None


def _architecture_note(src: Mapping, name: str) -> str:
    """Where the checkpoint's keys point to another registered model: which one, and how to convert it."""
    found = identify_architecture(src)
    if found is None or found[0] == name:
        return ""
    other, activation = found
    return (
        f"its parameter names and shapes are those of {other} (activation {activation!r}), not {name}: "
        f"convert it as {other} (--model {other}, or official.model={other} in eval.py); "
    )


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
        note = _architecture_note(src, name)
        hint = "" if note else _hint(unknown, missing)
        raise KeyError(f"checkpoint does not match {where}: {note}{'; '.join(parts)}{hint}")
    bad = [
        f"{k}: checkpoint {tuple(src[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in src and tuple(src[k].shape) != tuple(v.shape)
    ]
    if bad:
        note = _architecture_note(src, name)
        raise ValueError(f"{len(bad)} shape mismatch(es) for {name}: {note}" + "; ".join(bad[:_SHOW]))
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
