"""Tell activation, normalisation and bias parameters apart for optimisers and logging."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from acon.activations import ACON_MODULES


def activation_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (qualified name, parameter) for every learnable ACON parameter (p1, p2, β, p)."""
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ACON_MODULES):
            for name, p in mod.named_parameters(recurse=False):
                yield (f"{mod_name}.{name}" if mod_name else name), p


def is_weight_decayed(name: str, param: torch.Tensor) -> bool:
    """True only for conv/linear weights (the paper's rule): never BN, biases, p1, p2 or β."""
    return name.rsplit(".", 1)[-1] == "weight" and param.dim() > 1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimiser groups: decayed conv/linear weights, and everything else with weight_decay=0."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if is_weight_decayed(name, p) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
