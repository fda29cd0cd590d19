"""BatchNorm followed by ACON-C or Meta-ACON as one autograd op that never stores the BatchNorm output.

In the spirit of In-Place Activated BatchNorm (Rota Bulò et al., CVPR 2018): autograd saves the BatchNorm
input x (its backward needs it anyway), the per-channel mean and 1/std, and the small ACON parameters;
backward recomputes the normalised value z = (x - mean)·invstd·w + b, runs ACON's backward on it, and
then BatchNorm's. An unfused conv → BN → ACON pair keeps three tensors (x, z for ACON, y for the next
layer); fused it keeps two, as conv → BN → ReLU(inplace) does.

Kernels. On CPU, for contiguous fp32/bf16 NCHW whose spatial size holds at least one vector of the C++
kernels (``acon.fused.bn_native.rows_serve``), the row kernels of ``bn_acon_cpu.h`` never write z: forward
is one pass for the statistics (per-row sums, combined in float64) and one that normalises on load and
writes y; backward is one pass over x and dy that writes dz and sums, per row, ACON's parameter
gradients and BatchNorm's Σdz and Σdz·(x - mean), then one in place over dz that writes dx (BatchNorm's
backward as a per-channel affine combination of dz and x). Elsewhere (channels-last, fp64, small maps,
CUDA): contiguous NCHW statistics come from per-row sums combined in float64 (:func:`row_moments`;
running statistics follow ``nn.BatchNorm2d`` to fp32 rounding), other layouts from torch's
``batch_norm_update_stats`` (to the bit); BatchNorm's backward is ``native_batch_norm_backward``; ACON's
forward and backward are the fused ACON-C kernels of ``acon.fused`` (C++ on CPU, Triton on CUDA with
their self-check and fallback, the torch formulas elsewhere), and z is a temporary of one call, never
saved. :func:`single_pass` turns the row kernels off (benchmarks and tests compare the two).

Meta-ACON: its β network reads the spatial mean of z. The op runs the β network inside its forward
(building that small graph on (N, C) tensors) and, in backward, differentiates it with the ACON
gradient of β, so the β network's parameters get their gradients and z's spatial-mean gradient joins
z's gradient before BatchNorm's backward. On the row kernels the spatial mean is scale·(x's row mean) +
shift, from the statistics pass, and its gradient (the same for every value of a row) is folded into
BatchNorm's sums and into the dx pass analytically.

SyncBatchNorm (DDP): the sums Σx, Σx² and, in backward, Σdz, Σdz·x̂ are all-reduced over the group,
as :class:`acon.syncbn.GlooSyncBatchNorm` does (float64 sums; on the row kernels between the two backward
passes).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from acon.functional import spatial_mean
from acon.fused import bn_native, native
from acon.fused.beta_net import beta_net_grads, beta_net_params, run_beta_net
from acon.fused.layout import dense, same_layout, typed_like
from acon.fused.meta_native import native_beta_net
from acon.fused.ops import acon_c_backward_op, acon_c_op, native_serves, triton_importable, triton_on_cpu
from acon.syncbn import global_grad_means, global_moments, sync_bn_grads, update_running


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


def batch_statistics(
    x: Tensor, st: BNState, moments: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, float]:
    """Per-channel (mean, invstd) this call normalises with, and the number of values per channel they
    span (every rank's under SyncBN); moves the running statistics when asked. ``moments``: x's local
    per-channel mean and biased variance when already computed."""
    ct = _compute_dtype(x)
    count = x.numel() // x.shape[1]
    if not st.batch_stats:
        return st.running_mean.to(ct), torch.rsqrt(st.running_var.to(ct) + st.eps), count
    if st.group is not None:
        mean, var, total = global_moments(x, st.group)
        count = int(total)
    elif moments is not None:
        mean, var = moments
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


def bn_affine(
    mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(scale, shift) with (x - mean)·invstd·w + b = scale·x + shift, per channel."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
    return scale, shift


def normalise(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """z = (x - mean)·invstd·w + b as one per-channel affine, in x's dtype and strides."""
    scale, shift = bn_affine(mean, invstd, weight, bias)
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


_SINGLE_PASS = {"on": True}


@contextlib.contextmanager
def single_pass(enabled: bool) -> Iterator[None]:
    """Within the block, the row kernels serve the fused op where they can (``enabled``) or never (the
    multi-pass path everywhere: benchmarks and tests compare the two)."""
    old = _SINGLE_PASS["on"]
    _SINGLE_PASS["on"] = enabled
    try:
        yield
    finally:
        _SINGLE_PASS["on"] = old


def rows_path(x: Tensor) -> bool:
    """Whether the C++ BatchNorm + ACON-C row kernels serve this eager-mode ``x``."""
    return _SINGLE_PASS["on"] and native_serves(x) and bn_native.rows_serve(x)


def row_statistics(
    x: Tensor, st: BNState, meta: bool
) -> tuple[Tensor, Tensor, float, Tensor, Tensor, Tensor | None]:
    """(mean, invstd, count) as :func:`batch_statistics` gives them, the BatchNorm's (scale, shift), and x's
    per-row (spatial) means, float64 (N, C), where Meta-ACON needs them (else None), on the row kernels:
    the local statistics and the row means come from one pass, and with fp32 buffers and parameters the
    running statistics and the per-channel affine from one more call."""
    local = st.batch_stats and st.group is None
    moments = bn_native.bn_moments(x) if local or meta else (None, None, None)
    rm, rv = (st.running_mean, st.running_var) if st.update else (None, None)
    if local and bn_native.finishes_statistics(rm, rv, st.weight, st.bias):
        count = x.numel() // x.shape[1]
        unbias = count / max(count - 1, 1)
        out = bn_native.bn_finish_stats(*moments[1:], rm, rv, st.momentum, unbias, st.eps, st.weight, st.bias)
        return out[0], out[1], count, out[2], out[3], moments[0]
    mean, invstd, count = batch_statistics(x, st, moments[1:] if local else None)
    return mean, invstd, count, *bn_affine(mean, invstd, st.weight, st.bias), moments[0]


def rows_backward(
    ctx, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight, bias, p1, p2, beta, params
):
    """_BNAconC's backward on the row kernels: one pass writes dz and the sums, a second turns dz into dx.
    Meta-ACON's spatial-mean gradient (dzbar/S on every value of a row) is folded into the sums here and
    into the second pass."""
    need, c = ctx.needs_input_grad, x.shape[1]
    direct = not ctx.st.batch_stats and not ctx.meta  # eval BatchNorm: dx = scale·dz, from the first pass
    dz, dp1, dp2, dbeta, sums = bn_native.bn_acon_backward(
        dy.contiguous(), x, ctx.scale, ctx.shift, mean, ctx.scale if direct else None, p1, p2, beta
    )  # sums: float64 Σdz, Σdz·(x - mean) per channel
    dp1, dp2, dbeta = typed_like(dp1, p1), typed_like(dp2, p2), typed_like(dbeta, beta)
    param_grads, row_grad = [None] * len(params), None
    if ctx.meta:
        dzbar, param_grads = beta_net_grads(ctx, dbeta, params)
        dzbar, dbeta = dzbar.double(), None
        sums[:c] += dzbar.sum(0)
        sums[c:] += (dzbar * (ctx.row_mean - mean)).sum(0)  # Σ over a row of (x - mean)·dzbar/S
        row_grad = dzbar / (x.numel() // (x.shape[0] * x.shape[1]))
    dw = typed_like(sums[c:] * invstd, weight) if weight is not None and need[1] else None
    db = typed_like(sums[:c], bias) if bias is not None and need[2] else None
    dx = None
    if need[0]:
        dx = dz if direct else rows_input_grad(ctx, dz, x, mean, invstd, sums, row_grad)
    return (dx, dw, db, dp1, dp2, dbeta, None, None, *param_grads)


def rows_input_grad(ctx, dz, x, mean, invstd, sums, row_grad) -> Tensor:
    """BatchNorm's input gradient, in place over dz: torch's (dz - G - (x - mean)·k)·scale with G the mean
    of dz and k = invstd²·(the mean of dz·(x - mean)) over the batch (every rank's under SyncBN), or eval
    BatchNorm's scale·dz; ``row_grad`` (N, C), if any, is added to every dz of its row (Meta-ACON)."""
    st, c = ctx.st, x.shape[1]
    if not st.batch_stats:
        means, x = None, None
    elif st.group is None:
        means = sums / ctx.count
    else:
        means = torch.cat(global_grad_means(sums[:c], sums[c:], ctx.count, st.group))
    return bn_native.bn_input_grad_(dz, x, means, row_grad, mean, invstd, ctx.scale)


class _BNAconC(torch.autograd.Function):
    """y = ACON-C(BN(x)) saving x, the statistics and the parameters; β per channel, or generated from
    z's spatial mean by ``beta_fn`` (Meta-ACON) whose parameters are ``beta_params``."""

    @staticmethod
    def forward(ctx, x, weight, bias, p1, p2, beta, st: BNState, beta_fn, *beta_params):
        ctx.rows = rows_path(x)
        if ctx.rows:
            mean, invstd, count, scale, shift, ctx.row_mean = row_statistics(x, st, beta_fn is not None)
            ctx.scale, ctx.shift = scale, shift
        else:
            mean, invstd, count = batch_statistics(x, st)
            z = normalise(x, mean, invstd, weight, bias)
        if beta_fn is not None:
            zbar = ctx.row_mean * scale + shift if ctx.rows else spatial_mean(z)  # float64 from the rows
            beta = run_beta_net(ctx, beta_fn, zbar, x)
        y = (
            bn_native.bn_acon_forward(x, scale, shift, p1, p2, beta)
            if ctx.rows
            else acon_forward(z, p1, p2, beta)
        )
        ctx.st, ctx.meta, ctx.count = st, beta_fn is not None, count
        ctx.save_for_backward(x, mean, invstd, weight, bias, p1, p2, beta, *beta_params)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, weight, bias, p1, p2, beta, *beta_params = ctx.saved_tensors
        if ctx.rows:
            return rows_backward(ctx, dy, x, mean, invstd, weight, bias, p1, p2, beta, beta_params)
        z = normalise(x, mean, invstd, weight, bias)
        dz, dp1, dp2, dbeta = acon_backward(dy, z, p1, p2, beta)
        del z
        param_grads = [None] * len(beta_params)
        if ctx.meta:
            dzbar, param_grads = beta_net_grads(ctx, dbeta, beta_params)
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


def _inference_input(x: Tensor, st: BNState, meta: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Without autograd: (scale, shift) of the BatchNorm, and z's spatial mean (N, C) for Meta-ACON; z
    itself where the row kernels do not serve x (else None)."""
    if rows_path(x):
        _, _, _, scale, shift, row_mean = row_statistics(x, st, meta)
        zbar = (row_mean * scale + shift).to(x.dtype) if meta else None
        return scale, shift, zbar, None
    mean, invstd, _ = batch_statistics(x, st)
    z = normalise(x, mean, invstd, st.weight, st.bias)
    return None, None, spatial_mean(z) if meta else None, z


def _inference(x: Tensor, st: BNState, p1: Tensor, p2: Tensor, beta, meta: nn.Module | None) -> Tensor:
    scale, shift, zbar, z = _inference_input(x, st, meta is not None)
    if meta is not None:
        beta = meta.beta_from_mean(zbar, x)
    if z is None:
        return bn_native.bn_acon_forward(x, scale, shift, p1, p2, beta)
    return acon_forward(z, p1, p2, beta)


def bn_acon_c(x: Tensor, st: BNState, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    """ACON-C(BatchNorm(x)) with per-channel p1, p2, β of shape (1, C, 1, ...)."""
    x = dense(x)
    if (op := triton_op(x)) is not None:
        return op.bn_acon_c(x, st, p1, p2, beta)
    if not torch.is_grad_enabled():
        return _inference(x, st, p1, p2, beta, None)
    return _BNAconC.apply(x, st.weight, st.bias, p1, p2, beta, st, None)


def bn_meta_acon_c(x: Tensor, st: BNState, meta: nn.Module) -> Tensor:
    """Meta-ACON-C(BatchNorm(x)): ``meta`` is the :class:`acon.activations.MetaAconC` whose β network and
    p1, p2 apply (its ``beta_from_mean`` maps z's spatial mean to β)."""
    x = dense(x)
    if (op := triton_op(x)) is not None:
        return op.bn_meta_acon_c(x, st, meta)
    if not torch.is_grad_enabled():
        return _inference(x, st, meta.p1, meta.p2, None, meta)
    net = native_beta_net(meta, x)  # the C++ β network where it serves, else autograd over the module's
    params = net.params if net is not None else beta_net_params(meta)
    return _BNAconC.apply(
        x, st.weight, st.bias, meta.p1, meta.p2, None, st, net or meta.beta_from_mean, *params
    )


__all__ = ["BNState", "batch_statistics", "bn_acon_c", "bn_meta_acon_c", "normalise", "single_pass"]
