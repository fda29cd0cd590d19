"""Fused, memory-efficient ACON-C (used by ``AconC`` and ``MetaAconC`` with ``impl="auto"|"fused"``).

One custom autograd op (``acon.fused.ops``) saves only x plus the per-channel p1, p2 and β (or the
per-sample β of Meta-ACON) and recomputes the sigmoid in backward; backward yields dx, dp1, dp2 and dβ
in one pass. CUDA runs Triton kernels (``acon.fused.triton_kernels``); CPU runs C++ kernels
(``acon.fused.native``), or where they cannot be built the Inductor-compiled torch formulas of
``acon.fused.cpu``, or the same formulas eagerly when no C compiler is found. Under ``torch.compile`` the
forward is traced as plain torch ops instead and backward runs the fused backward op (:func:`traced_acon_c`):
an opaque forward op would keep Inductor from fusing it with the BatchNorm before it and from recomputing
it in backward, which costs a saved tensor per layer (compiled ShuffleNetV2 1.0x: 1.36x compiled ReLU's
saved activations through the op, 1.00x traced; ``scripts/bench_compile_memory.py``).
"""

from __future__ import annotations

import torch

from acon.fused import cpu, native, traced
from acon.fused.layout import dense
from acon.fused.ops import NativeAconC, acon_c_backward_op, acon_c_op, native_plan, triton_importable

# "auto" on CPU: the C++ kernels are faster than the reference form at every size measured (96 elements:
# 88 vs 134 µs forward+backward, one thread), so they serve any fp32/bf16 tensor. Inductor's compiled
# formulas (mode "compiled", and fp64/fp16 in mode "native") only win from about 64k elements, and their
# first call compiles (5-15 s), so below that "auto" keeps the reference form.
AUTO_MIN_NUMEL_CPU = 0
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
        if mode == "native":  # C++ kernels (Inductor's formulas if they fail to build: decided at run time)
            if x.dtype not in native.DTYPES:  # fp64, fp16: Inductor's formulas, a compile per shape family
                return x.numel() >= AUTO_MIN_NUMEL_CPU_COMPILED
            return x.numel() >= AUTO_MIN_NUMEL_CPU
        return mode == "compiled" and x.numel() >= AUTO_MIN_NUMEL_CPU_COMPILED
    return False


def check_shapes(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> None:
    """Raise a clear error unless p1, p2 are (1, C, 1, ...) and β (1 or N, C, 1, ...) for x (N, C, ...)."""
    if x.dim() < 2:
        raise ValueError(f"acon.fused.acon_c: x must be (N, C, ...), got shape {tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    for name, p, rows in (("p1", p1, (1,)), ("p2", p2, (1,)), ("beta", beta, (1, n))):
        shape = tuple(p.shape)
        if len(shape) < 2 or shape[0] not in rows or shape[1] != c or p.numel() != shape[0] * c:
            want = " or ".join(f"({r}, {c}, 1, ...)" for r in rows)
            raise ValueError(f"acon.fused.acon_c: {name} must be {want} for x {tuple(x.shape)}, got {shape}")


def traced_acon_c(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The fused ops' formulas as plain torch ops (computed in fp32, fp64 for fp64 x), for traced code:
    Inductor fuses them with their neighbours and its min-cut partitioner picks what backward recomputes,
    where the opaque custom op would force x to be saved. Backward is the fused ops' own (per-row sums
    over the spatial dims, then over N: ``acon.fused.traced``), which Inductor fuses into one loop with dx.
    Same values, gradients and NaN/±Inf convention as the fused ops (``acon.fused.cpu``)."""
    return traced.traced_acon_c(x, p1, p2, beta)


def _check_shapes_once(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> None:
    """:func:`check_shapes`, remembered per combination of shapes (eager calls repeat a few dozen)."""
    key = (x.dim(), *x.shape[:2], tuple(p1.shape), tuple(p2.shape), tuple(beta.shape))
    if key not in _SHAPES_OK:
        check_shapes(x, p1, p2, beta)
        if len(_SHAPES_OK) >= 1024:
            _SHAPES_OK.clear()
        _SHAPES_OK.add(key)


_SHAPES_OK: set[tuple] = set()


def acon_c(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Fused ACON-C: (p1 - p2)·x·σ(β(p1 - p2)·x) + p2·x, saving only x and the small parameters.

    Under ``torch.compile`` this is :func:`traced_acon_c`, visible to Inductor (see there)."""
    if torch.compiler.is_compiling():
        check_shapes(x, p1, p2, beta)
        return traced_acon_c(x, p1, p2, beta)
    plan = native_plan(x, p1, p2, beta, check_shapes)
    if plan is not None:
        return NativeAconC.apply(x, p1, p2, beta, plan)
    _check_shapes_once(x, p1, p2, beta)
    return acon_c_op(dense(x), p1, p2, beta)


__all__ = [
    "AUTO_MIN_NUMEL_CPU",
    "acon_c",
    "acon_c_backward_op",
    "acon_c_op",
    "available",
    "check_shapes",
    "traced_acon_c",
]
