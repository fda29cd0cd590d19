"""Self-check of the Triton ACON-C kernels: the first call per device, dtype and memory format runs them
forward and backward on a small tensor against the reference form. A compile error or a mismatch gives
one warning (:mod:`acon.fallbacks`) and that combination runs the eager torch formulas from then on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from acon import fallbacks
from acon.fused.layout import NSC, as_3d, compute_dtype, layout_of, like, param_grads, param_views

# tolerances against the fp64 reference on the same (rounded) inputs, as in tests/test_fused.py
TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}
_STATE: dict[tuple, bool] = {}


def _key(x: Tensor) -> tuple:
    return (str(x.device), x.dtype, layout_of(x))


def path_name(x: Tensor, kernel: str = "acon_c") -> str:
    """How the fallback registry names the ``kernel`` serving ``x``."""
    return f"{kernel} triton {x.device} {str(x.dtype).removeprefix('torch.')} " + (
        "channels_last" if layout_of(x) == NSC and x.dim() > 2 else "contiguous"
    )


def sample_inputs(like_x: Tensor, per_sample: bool) -> list[Tensor]:
    """Small seeded (x, p1, p2, β, dy) on ``like_x``'s device, dtype and memory format (odd sizes)."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 5, 3, 7)[: max(like_x.dim(), 2)]
    pshape = (1, 5) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    p1, p2 = (torch.randn(pshape, generator=g, dtype=torch.float64) for _ in range(2))
    beta = torch.rand((2 if per_sample else 1,) + pshape[1:], generator=g, dtype=torch.float64) * 2
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    out = [t.to(like_x.device, like_x.dtype) for t in (x, p1, p2, beta, dy)]
    if layout_of(like_x) == NSC and like_x.dim() > 2:  # the same channels-last strides
        out[0], out[4] = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (out[0], out[4]))
    return out


def reference_grads(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, dy: Tensor) -> list[Tensor]:
    """[y, dx, dp1, dp2, dβ] of the paper-form ACON-C in fp64, differentiated by hand (this runs inside the
    custom op, below autograd)."""
    from acon.functional import acon_c_reference

    x, p1, p2, beta, dy = (t.detach().double() for t in (x, p1, p2, beta, dy))
    u = (p1 - p2) * x
    s = torch.sigmoid(beta * u)
    g = s + beta * u * s * (1 - s)  # d(u·s)/du
    rows = [0] + list(range(2, x.dim()))

    def reduce(t: Tensor, per_sample: bool) -> Tensor:
        return t.sum(list(range(2, x.dim())) if per_sample else rows, keepdim=True)

    per_sample = beta.shape[0] > 1
    dp1 = reduce(dy * x * g, False)
    return [
        acon_c_reference(x, p1, p2, beta),
        dy * ((p1 - p2) * g + p2),
        dp1,
        reduce(dy * x, False) - dp1,
        reduce(dy * u * u * s * (1 - s), per_sample),
    ]


def mismatch(
    got: list[Tensor], want: list[Tensor], dtype: torch.dtype, names=("y", "dx", "dp1", "dp2", "dbeta")
) -> str | None:
    """A description of the first output out of tolerance (every output but y and dx is a gradient sum,
    scaled by its size), or None."""
    rtol, atol = TOLERANCE[dtype]
    for name, a, b in zip(names, got, want, strict=True):
        if a.shape != b.shape:
            return f"{name} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        scale = 1.0 if name in ("y", "dx") else float(b.abs().sum()) + 1.0
        err = (a.double() - b).abs() - rtol * b.abs()
        if not torch.isfinite(a).all() or float(err.max()) > atol * scale:
            return f"{name} differs from the reference by {float((a.double() - b).abs().max()):.3g}"
    return None


def _triton_run(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, dy: Tensor) -> list[Tensor]:
    from acon.fused import triton_kernels

    y = triton_kernels.forward(x, p1, p2, beta)
    dx, s1, s2, sb = triton_kernels.backward(dy, x, p1, p2, beta)
    return [y, dx, *param_grads(s1, s2, sb, p1, p2, beta)]


def first_call_check(key: tuple, path: str, check: Callable[[], str | None]) -> bool:
    """Whether ``check`` passed: it runs on the first call for ``key`` and returns a mismatch description
    or None; a mismatch or an exception records one fallback for ``path`` (one warning)."""
    if key not in _STATE:
        _STATE[key] = True
        try:
            reason = check()
        except Exception as e:  # a compile or launch error is a failed check, whatever its type
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        if reason:
            _STATE[key] = False
            fallbacks.record(path, reason)
    return _STATE[key]


def triton_ok(x: Tensor) -> bool:
    """Whether the Triton kernels passed their self-check for ``x``'s device, dtype and memory format."""

    def check() -> str | None:
        reason = None
        for per_sample in (False, True):
            inputs = sample_inputs(x, per_sample)
            reason = reason or mismatch(_triton_run(*inputs), reference_grads(*inputs), x.dtype)
        return reason

    return first_call_check(_key(x), path_name(x), check)


def reset() -> None:
    """Forget the results, so the next call checks again (tests)."""
    _STATE.clear()


def eager_forward(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    """The torch formulas, eagerly (no Inductor, no Triton): the fallback after a failed check."""
    from acon.fused.cpu import forward_math

    layout, ct = layout_of(x), compute_dtype(x.dtype)
    return like(forward_math(as_3d(x, layout), *param_views(p1, p2, beta, x, layout, ct), ct).contiguous(), x)


def eager_backward(dy: Tensor, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor):
    """(dx, Σ for dp1, Σ for dp2, Σ for dβ) by the eager torch formulas, as the kernels return them."""
    from acon.fused.cpu import backward_math
    from acon.fused.layout import NCS

    layout, ct = layout_of(x), compute_dtype(x.dtype)
    views = param_views(p1, p2, beta, x, layout, ct)
    sdim = 2 if layout == NCS else 1
    dx, s1, s2, sb = backward_math(as_3d(dy, layout), as_3d(x, layout), *views, ct, sdim)
    return like(dx.contiguous(), x), s1.sum(0), s2.sum(0), sb
