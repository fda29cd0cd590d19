"""Meta-ACON-C as one autograd op on the C++ CPU kernels, for eager mode (``MetaAconC`` with the C++ kernels).

Forward: one C++ call reads x once for its spatial mean and runs the β network σ(bn2(fc2(bn1(fc1(mean)))))
on the (N, C) rows (``meta_rows.h``), moving the BatchNorms' running statistics as ``nn.BatchNorm2d`` does
(the bookkeeping is :meth:`acon.activations.BatchNorm2dB1.rows_args`'s: momentum or cumulative average,
``num_batches_tracked``, eval mode, ``track_running_stats=False``, the batch-size-1 fallback); then the
ACON-C forward kernel of ``acon.fused.native`` with that per-sample β. Autograd saves x and one small fp32
buffer (the spatial mean, bn1's normalised rows and both BatchNorms' statistics); backward recomputes β
from it, runs the ACON-C backward kernel (dx, dp1, dp2 and the per-sample dβ), then one C++ call
differentiates the β network and adds the spatial-mean gradient to dx in place (one more pass over dx).

Against the module path (spatial mean as an ATen ``sum``, about 20 small ATen ops with autograd for the β
network, an expand-and-add into dx in backward) this saves a few hundred microseconds per layer at 7×7 and
one full-tensor pass; the β network's products run in fp32 whatever x's dtype (bf16 x under autocast too).

Served: what :func:`acon.fused.ops.native_serves` serves (fp32/bf16 CPU x, eager, C++ kernels built), with
the module's own β network (fc1/fc2 with bias, ``BatchNorm2dB1`` with affine parameters, no hooks on them)
in fp32 or bf16; bf16 parameters and running statistics are converted to fp32 for the kernels (the running
statistics written back, the gradients returned in bf16). Anything else (SyncBatchNorm or another swap,
hooks, fp64/fp16, tracing) takes the module path. Not twice differentiable (backward is marked so).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from acon.fused import native
from acon.fused.beta_net import leaf_beta_net_params
from acon.fused.layout import NSC, layout_of, same_layout, typed_like
from acon.fused.ops import native_serves


@functools.cache
def _kernels(lib: ctypes.CDLL) -> dict[str, object]:
    """The Meta-ACON entry points of the kernel library, with their argument types declared."""
    ptr, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    bn = [ptr] * 4 + [i32, f64, f64]  # weight, bias, running mean, running var, batch stats, momentum, eps
    out = {}
    for dtype, name in native.DTYPES.items():
        fwd = getattr(lib, f"meta_fwd_{name}")
        fwd.argtypes = [ptr, i32, ptr, ptr, ptr, ptr, *bn, ptr, ptr, *bn, i64, i64, i64, i64, i32]
        bwd = getattr(lib, f"meta_bwd_{name}")
        bwd.argtypes = [ptr, i32] + [ptr] * 8 + [i32, i32, ptr, i64, i64, i64, i64, i32]
        out[("fwd", dtype)], out[("bwd", dtype)] = fwd, bwd
    net = lib.meta_net_fwd
    net.argtypes = [ptr] * 3 + [ptr, ptr, *bn, ptr, ptr, *bn, i64, i64, i64]
    lib.meta_net_bwd.argtypes = [ptr] * 9 + [i32, i32, ptr, i64, i64, i64]
    out["net_fwd"], out["net_bwd"] = net, lib.meta_net_bwd
    lib.meta_beta.argtypes = [ptr] * 4 + [i64, i64, i64]
    lib.meta_saved_floats.argtypes = [i64, i64, i64]
    lib.meta_saved_floats.restype = i64
    out["beta"], out["saved_floats"] = lib.meta_beta, lib.meta_saved_floats
    return out


_FLOATS = (torch.float32, torch.bfloat16)


def _dense_float(tensors, dtype: torch.dtype | None = None) -> bool:
    """All contiguous fp32 or bf16 (all ``dtype`` when given). A loop: this runs on every call."""
    for t in tensors:
        if (t.dtype != dtype if dtype is not None else t.dtype not in _FLOATS) or not t.is_contiguous():
            return False
    return True


def served_params(meta: nn.Module, x: Tensor) -> list[Tensor] | None:
    """The β network's eight parameters when :func:`meta_acon_c` and :class:`NativeBetaNet` serve ``meta`` (an
    :class:`acon.activations.MetaAconC`) on eager-mode ``x``: the C++ kernels serve x, its BatchNorms are its
    own without hooks, the parameters are contiguous fp32 or bf16 tensors of one dtype and so are the running
    statistics (any of the two); else None."""
    if not native_serves(x) or x.dim() < 2 or x.numel() == 0 or not meta._plain_batchnorms():
        return None
    params = leaf_beta_net_params(meta)
    if params is None or params[0].dtype not in _FLOATS or not _dense_float(params, params[0].dtype):
        return None
    mods = meta._modules
    buffers = [b for bn in ("bn1", "bn2") for b in mods[bn]._buffers.values() if b is not None and b.dim()]
    return params if _dense_float(buffers) else None  # the running statistics (num_batches_tracked is 0-D)


def _fp32(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors as fp32: themselves when they are (bf16 parameters: fp32 copies, one conversion each)."""
    return tensors if tensors[0].dtype == torch.float32 else [t.float() for t in tensors]


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bn_call_args(bn: nn.Module, n: int, weight: Tensor, bias: Tensor) -> tuple[list, bool, list]:
    """The kernel's arguments for BatchNorm ``bn`` on n rows with its fp32 ``weight`` and ``bias`` (pointers,
    batch-statistics flag, momentum, eps; bookkeeping done), that flag, and (buffer, fp32 copy) pairs to
    copy back after the call (bf16 running statistics)."""
    _, _, rm, rv, use_batch, momentum, eps = bn.rows_args(n)
    rm32, rv32 = (t if t is None or t.dtype == torch.float32 else t.float() for t in (rm, rv))
    back = [(t, t32) for t, t32 in ((rm, rm32), (rv, rv32)) if t32 is not t]
    args = [
        weight.data_ptr(),
        bias.data_ptr(),
        _ptr(rm32),
        _ptr(rv32),
        int(use_batch),
        float(momentum),
        float(eps),
    ]
    return args, use_batch, back


def _net_args(meta: nn.Module, p32: list[Tensor], n: int) -> tuple[list, tuple[bool, bool], list]:
    """The β network's forward arguments for n rows (fc1 weight and bias, bn1's, fc2 weight and bias, bn2's:
    ``_bn_call_args``, bookkeeping done), the two batch-statistics flags, and the (buffer, fp32 copy) pairs
    to copy back after the call (:func:`_write_back`). Pointers into ``p32``: the caller holds it (and the
    copy-back pairs) until the call returns."""
    w1, b1, g1, e1, w2, b2, g2, e2 = p32
    mods = meta._modules
    bn1_args, batch1, back1 = _bn_call_args(mods["bn1"], n, g1, e1)
    bn2_args, batch2, back2 = _bn_call_args(mods["bn2"], n, g2, e2)
    args = [w1.data_ptr(), b1.data_ptr(), *bn1_args, w2.data_ptr(), b2.data_ptr(), *bn2_args]
    return args, (batch1, batch2), back1 + back2


def _write_back(back: list) -> None:
    for buffer, copy in back:
        buffer.copy_(copy)


def _net_grad_args(p32: list[Tensor], batch: tuple[bool, bool]) -> tuple[list, list[Tensor]]:
    """The β network's backward arguments after the saved buffer (fc1 weight, bn1 weight and bias, fc2 weight,
    bn2 weight, the batch-statistics flags, the table of the eight gradient arrays) and those arrays."""
    w1, _, g1, e1, w2, _, g2, _ = p32
    grads = [torch.empty_like(p) for p in p32]
    table = (ctypes.c_void_p * 8)(*(g.data_ptr() for g in grads))
    args = [
        w1.data_ptr(),
        g1.data_ptr(),
        e1.data_ptr(),
        w2.data_ptr(),
        g2.data_ptr(),
        *(int(b) for b in batch),
    ]
    return [*args, table], grads


class NativeMetaAconC(torch.autograd.Function):
    """y = ACON-C(x; p1, p2, β(x)) with β from Meta-ACON's β network on x's spatial mean (see the module
    docstring); gradients for x, p1, p2 and the β network's eight parameters (in their dtype)."""

    @staticmethod
    def forward(ctx, x, p1, p2, *params_and_meta):
        *params, meta = params_and_meta
        n, c = x.shape[0], x.shape[1]
        s, h = x.numel() // (n * c), params[0].shape[0]
        k = _kernels(native.library())
        p32 = _fp32(params)  # held until the call returns: the pointers may be into fp32 copies
        net_args, ctx.batch, back = _net_args(meta, p32, n)
        saved = torch.empty(k["saved_floats"](n, c, h))
        beta = torch.empty((n, c) + (1,) * (x.dim() - 2))
        k[("fwd", x.dtype)](
            x.data_ptr(), int(layout_of(x) == NSC), beta.data_ptr(), saved.data_ptr(), *net_args,
            n, c, s, h, torch.get_num_threads(),
        )  # fmt: skip
        _write_back(back)
        y = native.forward(x, p1, p2, beta)
        ctx.save_for_backward(x, p1, p2, *params, saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, p1, p2, *params, saved = ctx.saved_tensors
        n, c = x.shape[0], x.shape[1]
        s, h = x.numel() // (n * c), params[0].shape[0]
        p32 = _fp32(params)
        k = _kernels(native.library())
        beta = torch.empty((n, c) + (1,) * (x.dim() - 2))
        k["beta"](
            saved.data_ptr(), p32[6].data_ptr(), p32[7].data_ptr(), beta.data_ptr(), n, c, h
        )  # bn2's γ, β
        dx, dp1, dp2, dbeta = native.backward(same_layout(dy, x), x, p1, p2, beta)
        need = ctx.needs_input_grad
        grad_args, grads = _net_grad_args(p32, ctx.batch)
        k[("bwd", x.dtype)](
            dx.data_ptr() if need[0] else None, int(layout_of(x) == NSC), dbeta.data_ptr(), beta.data_ptr(),
            saved.data_ptr(), *grad_args, n, c, s, h, torch.get_num_threads(),
        )  # fmt: skip
        return (
            dx if need[0] else None,
            typed_like(dp1, p1) if need[1] else None,
            typed_like(dp2, p2) if need[2] else None,
            *(
                typed_like(g, p) if need[3 + i] else None
                for i, (g, p) in enumerate(zip(grads, params, strict=True))
            ),
            None,
        )


class NativeBetaNet:
    """Meta-ACON's β network on given (N, C) spatial means, in C++ (``meta_net_fwd``/``meta_net_bwd``), for the
    BatchNorm+ACON op (``acon.fused.bn_act``), which takes the means from its statistics: :meth:`forward`
    gives β, :meth:`backward` the means' gradient and the eight parameters' from dβ. Serves what
    :func:`served_params` serves; one instance per call (it keeps that call's saved buffer)."""

    def __init__(self, meta: nn.Module, params: list[Tensor]) -> None:
        self.meta, self.params = meta, params

    def forward(self, zbar: Tensor) -> Tensor:
        """β (N, C) in fp32 from the spatial means ``zbar`` (N, C), moving the BatchNorms' running statistics."""
        n, c = zbar.shape
        k = _kernels(native.library())
        p32 = _fp32(self.params)  # held until the call returns: the pointers may be into fp32 copies
        net_args, self.batch, back = _net_args(self.meta, p32, n)
        mean = zbar.detach().float().contiguous()
        self.h = self.params[0].shape[0]
        self.saved, self.beta = torch.empty(k["saved_floats"](n, c, self.h)), torch.empty(n, c)
        k["net_fwd"](
            mean.data_ptr(), self.beta.data_ptr(), self.saved.data_ptr(), *net_args, n, c, self.h
        )  # fmt: skip
        _write_back(back)
        return self.beta

    def backward(self, dbeta: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(the means' gradient (N, C) fp32, the eight parameters' gradients in their dtypes) from dβ (N, C)."""
        n, c = self.beta.shape
        p32 = _fp32(self.params)  # held until the call returns: the pointers may be into fp32 copies
        grad_args, grads = _net_grad_args(p32, self.batch)
        dzbar, db = torch.empty(n, c), dbeta.float().reshape(n, c).contiguous()
        _kernels(native.library())["net_bwd"](
            dzbar.data_ptr(), db.data_ptr(), self.beta.data_ptr(), self.saved.data_ptr(), *grad_args, n, c, self.h
        )  # fmt: skip
        return dzbar, [typed_like(g, p) for g, p in zip(grads, self.params, strict=True)]


def native_beta_net(meta: nn.Module, x: Tensor) -> NativeBetaNet | None:
    """The C++ β network for ``meta`` on eager-mode ``x`` where :func:`served_params` serves them, else None."""
    params = served_params(meta, x)
    return None if params is None else NativeBetaNet(meta, params)


def meta_acon_c(meta: nn.Module, x: Tensor, params: list[Tensor]) -> Tensor:
    """Meta-ACON-C of a dense x with ``meta``'s p1, p2 and β network, whose parameters :func:`served_params`
    returned."""
    return NativeMetaAconC.apply(x, meta.p1, meta.p2, *params, meta)


__all__ = ["NativeBetaNet", "NativeMetaAconC", "meta_acon_c", "native_beta_net", "served_params"]
