"""Fused, memory-efficient ACON-C (used by ``AconC`` and ``MetaAconC`` with ``impl="auto"|"fused"``).

One custom autograd op (``acon.fused.ops``) saves only x plus the per-channel p1, p2 and β (or the
per-sample β of Meta-ACON) and recomputes the sigmoid in backward; backward yields dx, dp1, dp2 and dβ
in one pass. CUDA runs Triton kernels (``acon.fused.triton_kernels``); CPU runs Inductor-compiled torch
formulas (``acon.fused.cpu``), or the same formulas eagerly when no C compiler is found.
"""

from __future__ import annotations

import torch

from acon.fused import cpu
from acon.fused.layout import dense
from acon.fused.ops import NativeAconC, acon_c_backward_op, acon_c_op, native_serves, triton_importable

# Below this many elements the CPU per-call overhead of the fused op outweighs its gain; "auto" then
# keeps the reference form (tiny tensors also never trigger a kernel compile). Measured crossover of
# forward+backward, one thread: 8k-32k elements with the C++ kernels, higher with Inductor's.
AUTO_MIN_NUMEL_CPU = 1 << 14
AUTO_MIN_NUMEL_CPU_COMPILED = 1 << 16
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_IMPLS = ("auto", "reference", "fused")


def available(x: torch.Tensor, impl: str) -> bool:
    """Whether a fused path serves ``x``: ``"auto"`` when it is the fastest correct one for x's device and
    dtype, ``"fused"`` when any exists (raises if none exists for x's device or dtype)."""
    if impl not in _IMPLS:
        raise ValueError(f"acon.fused.available: impl={impl!r} is not one of {_IMPLS}")
    if impl == "reference":
        return False
    dev = x.device.type
    if impl == "fused":
        if dev not in ("cpu", "cuda"):
            raise RuntimeError(
                f"acon.fused: no fused ACON-C path for device {dev!r}; use impl='reference' or 'auto'"
            )
        if x.dtype not in _FLOATS:
            raise TypeError(f"acon.fused: ACON-C needs a floating-point input, got dtype {x.dtype}")
        return True
    if x.dtype not in _FLOATS:
        return False
    if dev == "cuda":
        return triton_importable()
    if dev == "cpu":
        mode = cpu.mode()
        if mode == "native":  # C++ kernels, or Inductor's if they fail to build: decided at run time
            return x.numel() >= AUTO_MIN_NUMEL_CPU
        return mode == "compiled" and x.numel() >= AUTO_MIN_NUMEL_CPU_COMPILED
    return False


def _check_shapes(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"acon.fused.acon_c: x must be (N, C, ...), got shape {tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    for name, p, rows in (("p1", p1, (1,)), ("p2", p2, (1,)), ("beta", beta, (1, n))):
        shape = tuple(p.shape)
        if len(shape) < 2 or shape[0] not in rows or shape[1] != c or p.numel() != shape[0] * c:
            want = " or ".join(f"({r}, {c}, 1, ...)" for r in rows)
            raise ValueError(f"acon.fused.acon_c: {name} must be {want} for x {tuple(x.shape)}, got {shape}")


def acon_c(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Fused ACON-C: (p1 - p2)·x·σ(β(p1 - p2)·x) + p2·x, saving only x and the small parameters."""
    _check_shapes(x, p1, p2, beta)
    x = dense(x)
    if native_serves(x):
        return NativeAconC.apply(x, p1, p2, beta)
    return acon_c_op(x, p1, p2, beta)


__all__ = ["AUTO_MIN_NUMEL_CPU", "acon_c", "acon_c_backward_op", "acon_c_op", "available"]
