"""Fused ACON-C kernels (placeholder until the fused implementation lands): nothing is available,
so every module falls back to the reference form."""

from __future__ import annotations

import torch


def available(x: torch.Tensor, impl: str) -> bool:
    """Whether a fused path serves ``x`` for the requested ``impl``."""
    if impl == "fused":
        raise NotImplementedError("impl='fused' is not available yet; use impl='reference' or 'auto'")
    return False


def acon_c(x, p1, p2, beta):  # pragma: no cover - replaced by the fused implementation
    raise NotImplementedError
