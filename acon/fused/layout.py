"""Layout helpers shared by the fused ACON-C paths: view an (N, C, ...) tensor as 3-D without copying."""

from __future__ import annotations

import torch

NCS = "ncs"  # contiguous NCHW-like: (N, C, S) with S the flattened spatial dims
NSC = "nsc"  # channels-last-like: (N, S, C)


def layout_of(x: torch.Tensor) -> str | None:
    """``"ncs"`` if ``x`` is contiguous, ``"nsc"`` if channels-last dense, else ``None``."""
    if x.is_contiguous():
        return NCS
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None:  # one call, no permuted view (same test as below for these ranks)
        return NSC if x.is_contiguous(memory_format=fmt) else None
    if x.dim() >= 3 and x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        return NSC
    return None


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it has one of the two supported layouts, else a contiguous copy."""
    return x if layout_of(x) is not None else x.contiguous()


def as_3d(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a dense ``x`` as (N, C, S) for ``"ncs"`` or (N, S, C) for ``"nsc"``."""
    n, c = x.shape[:2]
    if layout == NCS:
        return x.reshape(n, c, -1)
    return x.permute(0, *range(2, x.dim()), 1).reshape(n, -1, c)


def like(y3: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reinterpret a dense 3-D result computed in ``x``'s layout with ``x``'s exact shape and strides."""
    return y3.as_strided(x.shape, x.stride())


def same_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (same shape as ``x``) with ``x``'s strides, copying only when they differ."""
    if t.stride() == x.stride():
        return t
    out = torch.empty_like(x)
    out.copy_(t)
    return out


def param_views(
    p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor, x: torch.Tensor, layout: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel p1, p2 and per-channel or per-sample β as ``dtype`` views broadcasting over the 3-D x."""
    c = x.shape[1]
    nb = beta.shape[0]
    if layout == NCS:
        shape, bshape = (1, c, 1), (nb, c, 1)
    else:
        shape, bshape = (1, 1, c), (nb, 1, c)
    return (
        p1.reshape(shape).to(dtype),
        p2.reshape(shape).to(dtype),
        beta.reshape(bshape).to(dtype),
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def typed_like(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``g`` in ``p``'s dtype (itself when it already is)."""
    return g if g.dtype == p.dtype else g.to(p.dtype)


def param_grads(
    s1: torch.Tensor,
    s2: torch.Tensor,
    sb: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel sums (C values) and β sums (N·C, or C values) as gradients shaped and typed like p1, p2, β."""
    if sb.numel() != beta.numel():
        sb = sb.sum(0, keepdim=True)
    return tuple(typed_like(g.reshape(p.shape), p) for g, p in ((s1, p1), (s2, p2), (sb, beta)))
