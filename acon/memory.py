"""Measure what autograd keeps for backward: the memory side of the activation benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def saved_tensor_bytes(module: nn.Module, forward: Callable[[], object]) -> int:
    """Bytes of distinct storages autograd saves while ``forward()`` runs, ``module``'s parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())
