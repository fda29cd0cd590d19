"""ACON-C as two ``torch.library`` custom ops with autograd: ``acon::acon_c`` and ``acon::acon_c_backward``.

Autograd saves only x and the per-channel p1, p2 and the per-channel or per-sample β; backward
recomputes the sigmoid. They work with autocast, DDP and channels_last. Traced code would see them as
opaque nodes, so ``acon.fused.acon_c`` (what the modules call) gives ``torch.compile`` the plain formula
instead (``acon.fused.traced_acon_c``), which Inductor fuses and recomputes. Device kernels:

- CUDA: Triton (``acon.fused.triton_kernels``) when Triton imports, else the torch formulas; the first
  call per device, dtype and memory format checks the kernels against the reference form
  (``acon.fused.selfcheck``) and falls back to the eager formulas, with one warning, if they fail;
- CPU: the C++ kernels of ``acon.fused.native`` on the N-D tensor, else the torch formulas of
  ``acon.fused.cpu`` on a 3-D view (Inductor-compiled when a C compiler exists).
  With ``ACON_FUSED_CPU_BACKEND=triton`` and ``TRITON_INTERPRET=1`` CPU runs the Triton kernels in the
  interpreter, which is how the kernels are tested without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from acon.fused import cpu, native, selfcheck
from acon.fused.layout import (
    as_3d,
    compute_dtype,
    layout_of,
    like,
    param_grads,
    param_views,
    same_layout,
    typed_like,
)


@functools.cache
def triton_importable() -> bool:
    """Whether ``triton`` imports in this process."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def triton_on_cpu() -> bool:
    """CPU tensors go through the Triton interpreter (tests only; the environment is read once per process)."""
    return (
        os.environ.get("ACON_FUSED_CPU_BACKEND") == "triton"
        and os.environ.get("TRITON_INTERPRET") == "1"
        and triton_importable()
    )


def _torch_forward(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    if cpu.execution(x) == "native":
        return native.forward(x, p1, p2, beta)
    layout, ct = layout_of(x), compute_dtype(x.dtype)
    y3 = cpu.forward(as_3d(x, layout), *param_views(p1, p2, beta, x, layout, ct), layout, ct)
    return like(y3.contiguous(), x)


def _torch_backward(dy: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor):
    if cpu.execution(x) == "native":
        return native.backward(dy, x, p1, p2, beta)
    layout, ct = layout_of(x), compute_dtype(x.dtype)
    views = param_views(p1, p2, beta, x, layout, ct)
    dx3, s1, s2, sb = cpu.backward(as_3d(dy, layout), as_3d(x, layout), *views, layout, ct)
    return like(dx3.contiguous(), x), s1, s2, sb


def _use_triton(x: Tensor) -> bool:
    return (x.is_cuda and triton_importable()) or (x.device.type == "cpu" and triton_on_cpu())


def _check(x: Tensor) -> None:
    if layout_of(x) is None:
        raise ValueError(f"acon::acon_c needs a contiguous or channels-last x, got strides {x.stride()}")


@torch.library.custom_op("acon::acon_c", mutates_args=())
def acon_c_op(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    """ACON-C forward on a dense x; p1, p2 are (1, C, 1..), β is (1, C, 1..) or (N, C, 1..)."""
    _check(x)
    if _use_triton(x):
        if not selfcheck.triton_ok(x):  # failed its first-call check: the eager formulas instead
            return selfcheck.eager_forward(x, p1, p2, beta)
        from acon.fused import triton_kernels

        return triton_kernels.forward(x, p1, p2, beta)
    return _torch_forward(x, p1, p2, beta)


@acon_c_op.register_fake
def _(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("acon::acon_c_backward", mutates_args=())
def acon_c_backward_op(
    dy: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dp1, dp2, dβ) of ACON-C in one pass over x and dy; dβ has β's shape (per channel or sample)."""
    _check(x)
    dy = same_layout(dy, x)
    if _use_triton(x) and not selfcheck.triton_ok(x):
        dx, s1, s2, sb = selfcheck.eager_backward(dy, x, p1, p2, beta)
    elif _use_triton(x):
        from acon.fused import triton_kernels

        dx, s1, s2, sb = triton_kernels.backward(dy, x, p1, p2, beta)
    else:
        dx, s1, s2, sb = _torch_backward(dy, x, p1, p2, beta)
    return (dx, *param_grads(s1, s2, sb, p1, p2, beta))


@acon_c_backward_op.register_fake
def _(dy: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor):
    new = lambda p: p.new_empty(p.shape)  # noqa: E731
    return torch.empty_like(x), new(p1), new(p2), new(beta)


def _setup_context(ctx, inputs, output) -> None:
    x, p1, p2, beta = inputs
    ctx.save_for_backward(x, p1, p2, beta)


def _backward(ctx, dy: Tensor):
    x, p1, p2, beta = ctx.saved_tensors
    return acon_c_backward_op(dy, x, p1, p2, beta)


torch.library.register_autograd("acon::acon_c", _backward, setup_context=_setup_context)


class NativeAconC(torch.autograd.Function):
    """``acon::acon_c`` straight on the C++ CPU kernels, for eager mode: the same saved tensors and
    results without the custom-op dispatch (about 0.15-0.25 ms less per forward+backward). Traced code
    gets the plain formula instead (``acon.fused.traced_acon_c``). ``plan`` is x's and β's call plan
    (:func:`native_plan`), kept for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, plan) -> Tensor:
        ctx.save_for_backward(x, p1, p2, beta)
        ctx.plan = plan
        return native.run_forward(plan, x, p1, p2, beta)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, p1, p2, beta = ctx.saved_tensors
        # autograd hands dy in x's shape; the kernels need x's strides too
        dx, g1, g2, gb = native.run_backward(ctx.plan, same_layout(dy, x), x, p1, p2, beta)
        return dx, typed_like(g1, p1), typed_like(g2, p2), typed_like(gb, beta), None


_PLANS: dict[tuple, object] = {}


def native_plan(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, check_shapes) -> native.Plan | None:
    """The C++ kernels' call plan when they serve eager-mode ``x`` with these parameters (dense, fp32/bf16,
    CPU, native mode: :func:`native_serves`), else ``None``. One cached lookup per call in place of the
    separate shape, layout and plan checks: ``check_shapes(x, p1, p2, beta)`` runs (and raises) once per
    combination of shapes."""
    if not native_serves(x):
        return None
    lib = native.library()  # in the key: tests swap builds
    key = (x.shape, x.stride(), x.dtype, p1.shape, p2.shape, beta.shape, torch.get_num_threads(), lib)
    plan = _PLANS.get(key)
    if plan is None:
        check_shapes(x, p1, p2, beta)
        if layout_of(x) is None:  # a strided x: the general path makes it dense
            return None
        plan = native.plan(x, beta)
        if len(_PLANS) >= 512:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def native_serves(x: Tensor) -> bool:
    """Whether eager-mode ``x`` (dense, CPU) runs on the C++ kernels, so :class:`NativeAconC` applies."""
    return (
        x.dtype in native.DTYPES  # the cheapest test first: a dict lookup (fp64 and fp16 fail here)
        and x.is_cpu
        and cpu.mode() == "native"
        and not torch.compiler.is_compiling()
        and not triton_on_cpu()
        and native.available()
    )


__all__ = [
    "NativeAconC",
    "acon_c_backward_op",
    "acon_c_op",
    "native_plan",
    "native_serves",
    "triton_importable",
    "triton_on_cpu",
]
