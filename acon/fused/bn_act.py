"""BatchNorm followed by ACON-C or Meta-ACON as one autograd op that never stores the BatchNorm output.

In the spirit of In-Place Activated BatchNorm (Rota Bulò et al., CVPR 2018): autograd saves the BatchNorm
input x (its backward needs it anyway), the per-channel mean and 1/std, and the small ACON parameters;
backward recomputes the normalised value z = (x - mean)·invstd·w + b, runs ACON's backward on it, and
then BatchNorm's. An unfused conv → BN → ACON pair keeps three tensors (x, z for ACON, y for the next
layer); fused it keeps two, as conv → BN → ReLU(inplace) does.

Kernels: contiguous NCHW statistics come from per-row sums combined in float64 (:func:`row_moments`;
running statistics follow ``nn.BatchNorm2d`` to fp32 rounding), other layouts from torch's
``batch_norm_update_stats`` (to the bit); BatchNorm's backward is ``native_batch_norm_backward``; ACON's
forward and backward are the fused ACON-C kernels of ``acon.fused`` (C++ on CPU, Triton on CUDA with
their self-check and fallback, the torch formulas elsewhere). z is a temporary of one call, never saved.

Meta-ACON: its β network reads the spatial mean of z. The op runs the β network inside its forward
(building that small graph on (N, C) tensors) and, in backward, differentiates it with the ACON
gradient of β, so the β network's parameters get their gradients and z's spatial-mean gradient joins
z's gradient before BatchNorm's backward.

SyncBatchNorm (DDP): the sums Σx, Σx² and, in backward, Σdz, Σdz·x̂ are all-reduced over the group,
as :class:`acon.syncbn.GlooSyncBatchNorm` does (float64 sums).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from acon.functional import spatial_mean
from acon.fused import native
from acon.fused.layout import dense, same_layout, typed_like
from acon.fused.ops import acon_c_backward_op, acon_c_op, native_serves, triton_importable, triton_on_cpu
from acon.syncbn import global_moments, sync_bn_grads, update_running


@dataclasses.dataclass
class BNState:
    """What one BatchNorm call uses: parameters, running buffers, and how statistics are obtained.

    ``batch_stats``: normalise with the batch's statistics (else the running ones); ``update``: also
    move the running statistics by ``momentum``; ``group``: all-reduce the statistics over this
    process group (SyncBatchNorm under DDP), ``None`` for local ones."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    eps: float
    momentum: float
    batch_stats: bool
    update: bool
    group: object | None = None


_ROW_DTYPES = (torch.float32, torch.float64)  # NCHW paths computed from per-row sums


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _view(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def batch_statistics(x: Tensor, st: BNState) -> tuple[Tensor, Tensor, float]:
    """Per-channel (mean, invstd) this call normalises with, and the number of values per channel they
    span (every rank's under SyncBN); moves the running statistics when asked."""
    ct = _compute_dtype(x)
    count = x.numel() // x.shape[1]
    if not st.batch_stats:
        return st.running_mean.to(ct), torch.rsqrt(st.running_var.to(ct) + st.eps), count
    if st.group is not None:
        mean, var, total = global_moments(x, st.group)
        count = int(total)
    elif x.is_contiguous() and x.dtype in _ROW_DTYPES and x.dim() > 2:
        mean, var = row_moments(x)
    else:
        rm, rv = (st.running_mean, st.running_var) if st.update else (None, None)
        mean, var = torch.batch_norm_update_stats(x, rm, rv, st.momentum)
        return mean.to(ct), torch.rsqrt(var.to(ct) + st.eps), count
    if st.update:
        update_running(st.running_mean, st.running_var, mean, var * count / max(count - 1, 1), st.momentum)
    return mean.to(ct), torch.rsqrt(var.to(ct) + st.eps), count


def row_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a contiguous (N, C, ...) x, in float64.

    Each (n, c) row is contiguous: its sum and its norm (Σx² without a temporary) are fast inner
    reductions (together about 10x faster than ``batch_norm_update_stats`` on NCHW at one thread); rows
    are combined by Chan's formula in float64, so the cancellation of Σx² - (Σx)²/m stays within a row."""
    n, c = x.shape[:2]
    rows = x.reshape(n, c, -1)
    m = rows.shape[2]
    s, ss = rows.sum(2).double(), torch.linalg.vector_norm(rows, dim=2).double().square()
    row_mean = s / m
    row_m2 = (ss - s * row_mean).clamp_min(0)
    mean = row_mean.mean(0)
    m2 = row_m2.sum(0) + m * (row_mean - mean).square().sum(0)
    return mean, m2 / (n * m)


def normalise(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """z = (x - mean)·invstd·w + b as one per-channel affine, in x's dtype and strides."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
    # one pass through BatchNorm's own eval kernel with mean 0 and variance 1 (eps 0): x·scale + shift
    # (addcmul with a broadcast first operand takes a slow path on CPU; mul then add_ is two passes)
    zeros, ones = scale.new_zeros(scale.shape), scale.new_ones(scale.shape)
    return torch.batch_norm(x, scale, shift, zeros, ones, False, 0.0, 0.0, False)


def acon_forward(z: Tensor, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    """ACON-C of a dense z on the fused kernels (no autograd)."""
    if native_serves(z):
        return native.forward(z, p1, p2, beta)
    return acon_c_op(z, p1, p2, beta)


def acon_backward(dy: Tensor, z: Tensor, p1: Tensor, p2: Tensor, beta: Tensor):
    """(dz, dp1, dp2, dβ) of ACON-C at z on the fused kernels; parameter gradients typed like them."""
    if native_serves(z):
        dz, g1, g2, gb = native.backward(same_layout(dy, z), z, p1, p2, beta)
        return dz, typed_like(g1, p1), typed_like(g2, p2), typed_like(gb, beta)
    return acon_c_backward_op(dy, z, p1, p2, beta)


def bn_backward(
    dz: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, count: float, st: BNState, mask: list[bool]
):
    """(dx, dw, db) of the BatchNorm given z's gradient (torch's kernel; all-reduced sums under SyncBN,
    ``count`` values per channel over the group)."""
    if st.batch_stats and st.group is not None:
        xhat = (x - _view(mean, x).to(x.dtype)) * _view(invstd, x).to(x.dtype)
        return sync_bn_grads(dz, xhat, st.weight, invstd, count, st.group)
    if st.batch_stats:
        return torch.ops.aten.native_batch_norm_backward(
            dz, x, st.weight, None, None, mean, invstd, True, st.eps, mask
        )
    k = invstd if st.weight is None else invstd * st.weight.to(invstd.dtype)
    dx = (dz * _view(k, x).to(dz.dtype)) if mask[0] else None
    dims = [0] + list(range(2, x.dim()))
    db = dz.sum(dims) if mask[2] else None
    dw = (dz * (x - _view(mean, x).to(x.dtype))).sum(dims) * invstd if mask[1] else None
    return dx, dw, db


class _BNAconC(torch.autograd.Function):
    """y = ACON-C(BN(x)) saving x, the statistics and the parameters; β per channel, or generated from
    z's spatial mean by ``beta_fn`` (Meta-ACON) whose parameters are ``beta_params``."""

    @staticmethod
    def forward(ctx, x, weight, bias, p1, p2, beta, st: BNState, beta_fn, *beta_params):
        mean, invstd, count = batch_statistics(x, st)
        z = normalise(x, mean, invstd, weight, bias)
        if beta_fn is not None:
            with torch.enable_grad():
                zbar = spatial_mean(z).detach().requires_grad_()
                beta_graph = beta_fn(zbar, z)
            beta = beta_graph.detach()
            ctx.beta_graph, ctx.zbar = beta_graph, zbar
        y = acon_forward(z, p1, p2, beta)
        del z
        ctx.st, ctx.meta, ctx.count = st, beta_fn is not None, count
        ctx.save_for_backward(x, mean, invstd, weight, bias, p1, p2, beta, *beta_params)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, weight, bias, p1, p2, beta, *beta_params = ctx.saved_tensors
        z = normalise(x, mean, invstd, weight, bias)
        dz, dp1, dp2, dbeta = acon_backward(dy, z, p1, p2, beta)
        del z
        param_grads = [None] * len(beta_params)
        if ctx.meta:
            wanted = [ctx.zbar] + [p for p in beta_params if p.requires_grad]
            # retained: small (N, C) tensors, freed with ctx; the outer graph may be run again (retain_graph)
            grads = torch.autograd.grad(ctx.beta_graph, wanted, dbeta, retain_graph=True, allow_unused=True)
            dzbar, it = grads[0], iter(grads[1:])
            param_grads = [next(it) if p.requires_grad else None for p in beta_params]
            s = x.numel() // (x.shape[0] * x.shape[1])
            dz.add_((dzbar / s).reshape(x.shape[:2] + (1,) * (x.dim() - 2)).to(dz.dtype))  # dz is ours
            dbeta = None
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[1], bias is not None and need[2]]
        dx, dw, db = (
            bn_backward(dz, x, mean, invstd, ctx.count, ctx.st, mask) if any(mask) else (None, None, None)
        )
        dw = typed_like(dw, weight) if dw is not None and mask[1] else None
        db = typed_like(db, bias) if db is not None and mask[2] else None
        return (dx if need[0] else None, dw, db, dp1, dp2, dbeta, None, None, *param_grads)


def triton_op(x: Tensor):
    """``acon.fused.triton_bn_act`` when its Triton kernels serve x (CUDA, or CPU under the Triton
    interpreter; self-check passed), else None (this module's op serves)."""
    if (x.is_cuda and triton_importable()) or (x.device.type == "cpu" and triton_on_cpu()):
        from acon.fused import triton_bn_act

        return triton_bn_act if triton_bn_act.serves(x) else None
    return None


def bn_acon_c(x: Tensor, st: BNState, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    """ACON-C(BatchNorm(x)) with per-channel p1, p2, β of shape (1, C, 1, ...)."""
    x = dense(x)
    if (op := triton_op(x)) is not None:
        return op.bn_acon_c(x, st, p1, p2, beta)
    if not torch.is_grad_enabled():
        mean, invstd, _ = batch_statistics(x, st)
        return acon_forward(normalise(x, mean, invstd, st.weight, st.bias), p1, p2, beta)
    return _BNAconC.apply(x, st.weight, st.bias, p1, p2, beta, st, None)


def bn_meta_acon_c(x: Tensor, st: BNState, meta: nn.Module) -> Tensor:
    """Meta-ACON-C(BatchNorm(x)): ``meta`` is the :class:`acon.activations.MetaAconC` whose β network and
    p1, p2 apply (its ``beta_from_mean`` maps z's spatial mean to β)."""
    x = dense(x)
    if (op := triton_op(x)) is not None:
        return op.bn_meta_acon_c(x, st, meta)
    if not torch.is_grad_enabled():
        mean, invstd, _ = batch_statistics(x, st)
        z = normalise(x, mean, invstd, st.weight, st.bias)
        return acon_forward(z, meta.p1, meta.p2, meta.beta_from_mean(spatial_mean(z), z))
    params = [meta.fc1.weight, meta.fc1.bias, meta.bn1.weight, meta.bn1.bias]
    params += [meta.fc2.weight, meta.fc2.bias, meta.bn2.weight, meta.bn2.bias]
    params = [p for p in params if p is not None]
    return _BNAconC.apply(x, st.weight, st.bias, meta.p1, meta.p2, None, st, meta.beta_from_mean, *params)


__all__ = ["BNState", "batch_statistics", "bn_acon_c", "bn_meta_acon_c", "normalise"]
