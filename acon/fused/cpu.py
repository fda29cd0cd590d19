"""ACON-C forward/backward for the fused path on any device without Triton (CPU first).

The math works on a 3-D view of x, (N, C, S) or (N, S, C) (see ``acon.fused.layout``), in fp32 (fp64 for
fp64 inputs). Three executions exist, selected by ``mode()``:

- ``native``: the C++ kernels of ``acon.fused.native`` (fp32 and bf16; other dtypes use ``compiled``, or
  ``eager`` without a compiler): one pass per direction, no scalar tails on short rows, no per-call
  tracing. Built on first use with the system C++ compiler.
- ``compiled``: the torch formulas below through ``torch.compile`` (Inductor emits one fused C++/OpenMP
  loop per pass, so forward reads x once and backward reads x and dy once). Needs a C compiler.
- ``eager``: the same formulas as plain vectorised torch ops (always available; temporaries live only
  inside one call).

``scripts/bench_activation.py`` measures all three; the default is the first one that works here.

NaN and ±Inf (every fused path: the C++ kernels at each vector width, the Triton kernels, the Inductor and
eager formulas). The fused ops evaluate (p1 - p2)·x·σ(β(p1 - p2)·x) + p2·x and its gradients in IEEE
arithmetic, with σ(+∞) = 1, σ(-∞) = 0 and σ'(±∞) = 0 exactly. A NaN or ±Inf in x, p1, p2 or β therefore
gives NaN and ±Inf in the output and in dx, dp1, dp2 and dβ exactly where the paper form
(``acon.functional.acon_c_reference``) gives them, with one convention where x itself is ±∞: there the
paper form's p1·x - p2·x is ∞ - ∞ or 0·∞, so its output is NaN, while the fused output is this form's
value: ±∞ (the limit, p1·x) where β(p1 - p2)·x > 0 and p2 is non-zero with the sign of p1 - p2, NaN
otherwise (so x = +∞ with β(p1 - p2) < 0 gives (±∞)·0 = NaN, as the paper form does, although the
function tends to p2·x there). Every gradient at such an x is NaN in both. Finite inputs whose terms
overflow fp32 (|x| around 1e19 and beyond) can give ±Inf or NaN where the exact value is finite, as the
paper form in fp32 does. ``tests/test_fused_fuzz.py`` checks all of this on every path.
"""

from __future__ import annotations

import functools
import os
import shutil
import types
import warnings
from collections.abc import Callable

import torch

from acon.fused import native
from acon.fused.layout import NCS


def forward_math(
    x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor, ct: torch.dtype
) -> torch.Tensor:
    """y = (p1 - p2)·x·σ(β(p1 - p2)·x) + p2·x computed in ``ct``, returned in x's dtype (NaN and ±Inf: see
    the module docstring)."""
    xf = x.to(ct)
    u = (p1 - p2) * xf
    return (u * torch.sigmoid(beta * u) + p2 * xf).to(x.dtype)


def backward_math(
    dy: torch.Tensor,
    x: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    beta: torch.Tensor,
    ct: torch.dtype,
    sdim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx and, per (N, C), the sums Σdy·x·g (→dp1), Σdy·x·(1-g) (→dp2) and Σdy·u²σ'(z) (→dβ) over S.

    With d = p1 - p2, u = d·x, z = β·u, s = σ(z): g = s·(1 + z·(1 - s)) = ∂(u·s)/∂u and
    dy/dx = d·g + p2, dy/dp1 = x·g, dy/dp2 = x·(1 - g), dy/dβ = u²·s·(1 - s). Reducing over S only keeps
    every output in one loop nest (outer N·C, inner S), which Inductor fuses into a single pass; the
    caller sums the small (N, C) results over N (2x faster than reducing over (N, S) here). The dβ term is
    formed as (dy·u)·(u·σ'(z)): u² alone can overflow where the term is 0 (the paper form never forms u²).
    """
    xf, dyf = x.to(ct), dy.to(ct)
    d = p1 - p2
    u = d * xf
    z = beta * u
    s = torch.sigmoid(z)
    sp = s * (1 - s)
    g = s + z * sp
    dx = (dyf * (d * g + p2)).to(x.dtype)
    gx = dyf * xf
    sum_p1 = (gx * g).sum(sdim)
    sum_p2 = (gx * (1 - g)).sum(sdim)
    sum_beta = (dyf * u * (u * sp)).sum(sdim)  # u·sp first: u² may overflow where u·σ'(z) is 0
    return dx, sum_p1, sum_p2, sum_beta


def _fresh_copy(fn: Callable, tag: str) -> Callable:
    """A copy of ``fn`` with its own code object, so each compiled variant has its own Dynamo cache."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


@functools.cache
def _compiled(kind: str, key: tuple) -> Callable:
    fn = forward_math if kind == "fwd" else backward_math
    tag = "_".join(str(k).replace("torch.", "") for k in key)
    return torch.compile(_fresh_copy(fn, tag), dynamic=True, fullgraph=True)


def _detect_compiler() -> bool:
    if os.environ.get("ACON_FUSED_NO_COMPILE", "0") == "1":
        return False
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


_COMPILE_OK = _detect_compiler()  # decided at import so Dynamo never traces a filesystem lookup


def compile_supported() -> bool:
    """Whether ``torch.compile`` can build CPU kernels here (a C compiler is found and not disabled)."""
    return _COMPILE_OK


def default_mode() -> str:
    """``"native"`` when a C++ compiler is found, else ``"eager"``.

    Decided without building anything, so it is safe inside traced code; if the C++ kernels then fail to
    build, ``native`` runs the Inductor-compiled formulas instead (see ``execution``).
    """
    return "native" if compile_supported() else "eager"


MODES = ("native", "compiled", "eager")


_MODE = {"cpu": None}


def set_mode(mode: str | None) -> None:
    """Force the CPU execution mode (one of ``MODES``), or ``None`` for the default."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"acon.fused.cpu.set_mode: mode={mode!r} is not one of {MODES} or None")
    _MODE["cpu"] = mode


def mode() -> str:
    """The CPU execution mode in use."""
    return _MODE["cpu"] or default_mode()


def _run_compiled(kind: str, key: tuple, eager: Callable, *args):
    """Run the compiled variant on detached inputs (one guard set whatever autograd state the caller has);
    if Dynamo gives up on it (e.g. its recompile limit), switch that variant to the eager formulas."""
    if (kind, key) in _EAGER_FALLBACK:
        return eager(*args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    try:
        with torch.no_grad():
            return _compiled(kind, key)(*detached)
    except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
        _EAGER_FALLBACK.add((kind, key))
        warnings.warn(
            f"acon.fused: compiled CPU kernel {kind}{key} unavailable ({type(e).__name__}); "
            "using the eager formulas for it",
            stacklevel=2,
        )
        return eager(*args)


_EAGER_FALLBACK: set = set()


def execution(x: torch.Tensor) -> str:
    """The execution serving ``x``: the chosen mode, narrowed to what exists for its device and dtype."""
    m = mode()
    if torch.compiler.is_compiling():
        return "eager"
    if m == "native":
        if native.supports(x) and native.available():
            return "native"
        return "compiled" if compile_supported() else "eager"
    return m


def forward(x3, p1, p2, beta, layout: str, ct: torch.dtype) -> torch.Tensor:
    """The torch formulas' forward on the 3-D view ``x3`` with broadcastable parameter views (``eager`` if
    that is the execution, else ``compiled``; the ``native`` kernels take the N-D tensor, see ``acon.fused.ops``)."""
    if execution(x3) == "eager":
        return forward_math(x3, p1, p2, beta, ct)
    key = (layout, x3.dtype, beta.shape[0] > 1)
    return _run_compiled("fwd", key, forward_math, x3, p1, p2, beta, ct)


def backward(dy3, x3, p1, p2, beta, layout: str, ct: torch.dtype):
    """The torch formulas' backward on the 3-D views, chosen like :func:`forward`: (dx3, Σ for dp1 (C,),
    Σ for dp2 (C,), Σ for dβ ((N, C) or (1, C)))."""
    sdim = 2 if layout == NCS else 1
    if execution(x3) == "eager":
        dx, s1, s2, sb = backward_math(dy3, x3, p1, p2, beta, ct, sdim)
    else:
        key = (layout, x3.dtype, beta.shape[0] > 1)
        dx, s1, s2, sb = _run_compiled("bwd", key, backward_math, dy3, x3, p1, p2, beta, ct, sdim)
    return dx, s1.sum(0), s2.sum(0), sb
