"""Paper-form (reference) ACON functions: the ground truth every faster path is tested against."""

from __future__ import annotations

import math

import torch


def check_channels(x: torch.Tensor, channels: int) -> None:
    """Raise a clear error unless ``x`` is (N, C, ...) with C = ``channels``."""
    if x.dim() < 2:
        raise ValueError(f"activation input must be (N, C, ...), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"activation has {channels} channels but its input has shape {tuple(x.shape)} (channels at dim 1)"
        )


def channel_view(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel parameter stored as (1, C, 1, 1), or a per-sample one (N, C, 1, 1), to
    broadcast over ``x`` (N, C, ...) in x's dtype."""
    check_channels(x, param.shape[1] if param.dim() >= 2 else param.numel())
    n, c = x.shape[:2]
    rows = 1 if param.numel() == c else n
    if param.numel() != rows * c or (rows > 1 and param.shape[0] != n):
        raise ValueError(
            f"activation parameter of shape {tuple(param.shape)} fits neither (1, {c}, ...) nor "
            f"({n}, {c}, ...) for input shape {tuple(x.shape)}"
        )
    return param.reshape((rows, -1) + (1,) * (x.dim() - 2)).to(x.dtype)


def acon_c_reference(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ACON-C, (p1 - p2)·x·σ(β(p1 - p2)·x) + p2·x, exactly as the authors wrote it.

    The authors' p1·x - p2·x makes the output NaN wherever x is ±∞ (∞ - ∞ or 0·∞); the fused ops form
    (p1 - p2)·x and give the limit ±∞ there where it exists (``acon.fused.cpu`` states the convention)."""
    dpx = p1 * x - p2 * x
    return dpx * torch.sigmoid(beta * dpx) + p2 * x


def swish_reference(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Swish / ACON-A, x·σ(βx)."""
    return x * torch.sigmoid(beta * x)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim after (N, C), as (N, C).

    Written as a sum times 1/S: its backward is then a broadcast view of the (N, C) gradient, which
    autograd adds straight into x's other gradient, where ``mean``'s backward divides a full-size copy.
    Summing over the dims (no flatten) also reads channels-last x without copying it."""
    if x.dim() < 2:
        raise ValueError(f"activation input must be (N, C, ...), got shape {tuple(x.shape)}")
    if x.dim() == 2:
        return x
    dims = tuple(range(2, x.dim()))
    return x.sum(dims) * (1.0 / math.prod(x.shape[2:]))


def scripted_channel_view(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``channel_view`` for TorchScript (no shape checks): (1|N, C, 1, 1) reshaped to x's rank and dtype."""
    shape = [param.shape[0], param.shape[1]] + [1] * (x.dim() - 2)
    return param.reshape(shape).to(x.dtype)


def scripted_spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """``spatial_mean`` for TorchScript: mean over every dim after (N, C), as (N, C)."""
    if x.dim() == 2:
        return x
    return x.flatten(2).mean(2)
