"""BatchNorm → ACON-C / Meta-ACON on the Triton kernels of ``acon.fused.triton_bn_kernels`` (CUDA; CPU
tensors under ``TRITON_INTERPRET=1`` with ``ACON_FUSED_CPU_BACKEND=triton``).

The same op as ``acon.fused.bn_act`` (which dispatches here): autograd saves the BatchNorm input x, the
per-channel statistics and the small parameters, and backward recomputes the normalised z, but every
element-wise step is one Triton pass: statistics, forward (z on load, never stored), backward pass 1
(ACON's gradient and every per-channel sum) and pass 2 (dx), with eval or frozen BatchNorm in one pass.

Meta-ACON: the β network reads z's spatial mean, here (row mean of x - mean)·a + b from the statistics
pass; in backward, between the passes, the β network is differentiated with pass 1's dβ sums, its
parameters get their gradients, and its spatial-mean gradient dzbar joins dz as dzbar/S per (n, c):
BatchNorm's sums get its share in the float64 coefficient kernel, pass 2 adds it per (n, c).

Launches per pair and training step: forward, 4 Triton kernels (statistics, their float64 combination,
the coefficient table, y) and about 8 small torch ops (invstd, the running-statistics update); backward,
4 Triton kernels (the coefficient table again, pass 1, dx's coefficients, pass 2; no pass 2 for eval
BatchNorm without a β network), two torch reductions of the partial sums and the gradients' casts.

Running statistics follow ``nn.BatchNorm2d`` (momentum, unbiased variance; ``num_batches_tracked`` is
counted by ``acon.fuse_bn.bn_state``). SyncBatchNorm (a process group): Σx, Σx² and, in backward, Σdz,
Σdz·x̂ are all-reduced in float64 as ``acon.syncbn`` does. Empty batches run ``acon.fused.bn_act``'s op. Each device, dtype and memory format is checked on its first call against the
fp64 torch reference (training, Meta-ACON's per-sample β with a spatial-mean gradient, eval); a failure
warns once (``acon.fallbacks``) and that combination runs ``acon.fused.bn_act``'s op from then on.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

from acon.fused import selfcheck
from acon.fused import triton_bn_channels as ch
from acon.fused import triton_bn_kernels as tk
from acon.fused.beta_net import beta_net_grads, beta_net_params, run_beta_net
from acon.fused.layout import compute_dtype, layout_of, param_grads, same_layout, typed_like
from acon.syncbn import combine_moments, global_sum, update_running

_CHECK_NAMES = ("y", "dx", "dweight", "dbias", "dp1", "dp2", "dbeta")


def statistics(x: Tensor, st, rows: bool) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """Per-channel (mean, invstd) this call normalises with (float64), the per-(n, c) spatial means of x
    (for batch statistics, or when ``rows`` asks) and the number of values per channel the statistics
    span (every rank's under SyncBatchNorm); moves the running statistics when ``st`` says so."""
    count = x.numel() // x.shape[1]
    if not st.batch_stats:
        row_mean = tk.moments(x)[2] if rows else None
        return st.running_mean.double(), torch.rsqrt(st.running_var.double() + st.eps), row_mean, count
    mean, var, row_mean = tk.moments(x)
    if st.group is not None:
        mean, var, count = synced_moments(mean, var, count, st.group)
    if st.update:
        update_running(st.running_mean, st.running_var, mean, var * count / max(count - 1, 1), st.momentum)
    return mean, torch.rsqrt(var + st.eps), row_mean, count


def synced_moments(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, int]:
    """Mean and biased variance over every rank of ``group`` from this rank's (float64 Σx, Σx² and count
    all-reduced by ``acon.syncbn.combine_moments``), and the global count."""
    mean, var, n = combine_moments(mean * count, (var + mean * mean) * count, float(count), group)
    return mean, var, int(n)


def spatial_mean_of_z(coef: Tensor, row_mean: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, C) spatial mean of z = (x - mean)·a + b from x's row means, in ``dtype``."""
    mean, a, b = (coef[k].double() for k in (ch.MEAN, ch.SCALE, ch.SHIFT))
    return ((row_mean - mean) * a + b).to(dtype)


def backward_passes(dy, x, coef, invstd, row_mean, beta, st, count: int, want_dx: bool, dzbar_of):
    """(dx or None, (Σ→dp1, Σ→dp2, Σ→dβ per (n, c)), Σdz, Σdz·x̂) of the fused op (this rank's sums);
    ``dzbar_of`` maps the dβ sums to z's spatial-mean gradient (Meta-ACON's β network backward), or is
    None; ``count`` values per channel (every rank's) gave the statistics."""
    one_pass = want_dx and not st.batch_stats and dzbar_of is None
    sums, sb, dx = tk.backward_sums(dy, x, coef, beta, eval_dx=one_pass)
    dzbar = None if dzbar_of is None else dzbar_of(sb)
    spatial, synced = x.numel() // (x.shape[0] * x.shape[1]), st.batch_stats and st.group is not None
    local = st.batch_stats and not synced
    coef, shift, bn = ch.dx_coefficients(sums, coef, invstd, dzbar, row_mean, count, spatial, local)
    if want_dx and synced:  # dx's batch terms from every rank's Σdz, Σdz·x̂
        total, a = global_sum(bn, st.group), coef[ch.SCALE].double()
        coef[ch.DX_X] = (-a * invstd * total[1] / count).to(coef.dtype)
        shift = (shift.double() - a * total[0] / count).to(shift.dtype)
    if want_dx and dx is None:
        dx = tk.backward_dx(dy, x, coef, beta, shift, st.batch_stats)
    return dx, (sums[0], sums[1], sb), bn[0], bn[1]


class _TritonBNAconC(torch.autograd.Function):
    """y = ACON-C(BN(x)) on the Triton kernels, saving x, the statistics and the parameters; β per channel,
    or generated from z's spatial mean by ``beta_fn`` (Meta-ACON) whose parameters are ``beta_params``."""

    @staticmethod
    def forward(ctx, x, weight, bias, p1, p2, beta, st, beta_fn, *beta_params):
        meta = beta_fn is not None
        mean, invstd, row_mean, count = statistics(x, st, rows=meta)
        ct = compute_dtype(x.dtype)  # saved in it (the bytes BatchNorm saves), so the table is rebuilt alike
        mean, invstd = mean.to(ct), invstd.to(ct)
        coef = ch.coefficients(mean, invstd, weight, bias, p1, p2, ct)
        if meta:
            beta = run_beta_net(ctx, beta_fn, spatial_mean_of_z(coef, row_mean, x.dtype), x)
        ctx.st, ctx.meta, ctx.count = st, meta, count
        # the coefficient table is rebuilt in backward: saved, it would be 3x the bytes of mean and invstd
        ctx.save_for_backward(
            x, mean, invstd, row_mean if meta else None, weight, bias, p1, p2, beta, *beta_params
        )
        return tk.forward(x, coef, beta)

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, row_mean, weight, bias, p1, p2, beta, *beta_params = ctx.saved_tensors
        coef = ch.coefficients(mean, invstd, weight, bias, p1, p2, compute_dtype(x.dtype))
        need = ctx.needs_input_grad
        param_grads_meta: list = [None] * len(beta_params)

        def dzbar_of(sb: Tensor) -> Tensor:
            dzbar, param_grads_meta[:] = beta_net_grads(
                ctx, typed_like(sb.reshape(beta.shape), beta), beta_params
            )
            return dzbar

        dx, (s1, s2, sb), sdz, sdzxhat = backward_passes(
            same_layout(dy, x), x, coef, invstd, row_mean, beta, ctx.st, ctx.count, need[0],
            dzbar_of if ctx.meta else None,
        )  # fmt: skip
        dp1, dp2, dbeta = param_grads(s1, s2, sb, p1, p2, beta)
        dw = typed_like(sdzxhat, weight) if weight is not None and need[1] else None
        db = typed_like(sdz, bias) if bias is not None and need[2] else None
        return (dx, dw, db, dp1, dp2, None if ctx.meta else dbeta, None, None, *param_grads_meta)


def bn_acon_c(x: Tensor, st, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
    """ACON-C(BatchNorm(x)) for a dense x with per-channel p1, p2, β of shape (1, C, 1, ...)."""
    if not torch.is_grad_enabled():
        mean, invstd, _, _ = statistics(x, st, rows=False)
        return tk.forward(
            x, ch.coefficients(mean, invstd, st.weight, st.bias, p1, p2, compute_dtype(x.dtype)), beta
        )
    return _TritonBNAconC.apply(x, st.weight, st.bias, p1, p2, beta, st, None)


def bn_meta_acon_c(x: Tensor, st, meta: nn.Module) -> Tensor:
    """Meta-ACON-C(BatchNorm(x)) for a dense x: ``meta`` is the :class:`acon.activations.MetaAconC` whose
    β network (``beta_from_mean``) and p1, p2 apply."""
    if not torch.is_grad_enabled():
        mean, invstd, row_mean, _ = statistics(x, st, rows=True)
        coef = ch.coefficients(mean, invstd, st.weight, st.bias, meta.p1, meta.p2, compute_dtype(x.dtype))
        return tk.forward(x, coef, meta.beta_from_mean(spatial_mean_of_z(coef, row_mean, x.dtype), x))
    return _TritonBNAconC.apply(
        x, st.weight, st.bias, meta.p1, meta.p2, None, st, meta.beta_from_mean, *beta_net_params(meta)
    )


def serves(x: Tensor) -> bool:
    """Whether these kernels run BatchNorm → ACON for dense ``x``: a non-empty x and a passed first-call
    self-check for x's device, dtype and memory format."""
    if x.numel() == 0 or x.dim() < 2 or layout_of(x) is None:
        return False
    key = ("bn_acon_c", str(x.device), x.dtype, layout_of(x))
    return selfcheck.first_call_check(key, selfcheck.path_name(x, "bn_acon_c"), lambda: self_check(x))


def _kernel_run(x, w, b, p1, p2, beta, dy, e, running) -> list[Tensor]:
    """[y, dx, dw, db, dp1, dp2, dβ] of the kernels for BatchNorm weight w, bias b (batch statistics, or
    ``running`` = (mean, var)) and an extra gradient e per (n, c) on z's spatial mean (if not None)."""
    rm, rv = (None, None) if running is None else running
    st = SimpleNamespace(
        batch_stats=rm is None, update=False, group=None, running_mean=rm, running_var=rv, eps=1e-5
    )
    mean, invstd, row_mean, count = statistics(x, st, rows=True)
    coef = ch.coefficients(mean, invstd, w, b, p1, p2, compute_dtype(x.dtype))
    dzbar_of = None if e is None else (lambda sb: e * (x.numel() // (x.shape[0] * x.shape[1])))
    y = tk.forward(x, coef, beta)
    dx, (s1, s2, sb), sdz, sdzxhat = backward_passes(
        dy, x, coef, invstd, row_mean, beta, st, count, True, dzbar_of
    )
    return [y, dx, sdzxhat, sdz, *param_grads(s1, s2, sb, p1, p2, beta)]


def _reference(x, w, b, p1, p2, beta, dy, e, running) -> list[Tensor]:
    """The same outputs in fp64 by hand, without autograd (a first call may run under the caller's
    saved-tensor hooks or inference mode): ACON-C's gradients by ``selfcheck.reference_grads``, then
    BatchNorm's backward by its formulas."""
    x, w, b, dy = (t.detach().double() for t in (x, w, b, dy))
    dims, view = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
    if running is None:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = running[0].double(), running[1].double()
    invstd = torch.rsqrt(var + 1e-5)
    xhat = (x - mean.reshape(view)) * invstd.reshape(view)
    y, dz, dp1, dp2, dbeta = selfcheck.reference_grads(
        xhat * w.reshape(view) + b.reshape(view), p1, p2, beta, dy
    )
    if e is not None:
        dz = dz + e.double().reshape(e.shape + (1,) * (x.dim() - 2))
    db, dw = dz.sum(dims), (dz * xhat).sum(dims)
    if running is None:
        count = x.numel() // x.shape[1]
        dz = dz - (db / count).reshape(view) - xhat * (dw / count).reshape(view)
    return [y, dz * (invstd * w).reshape(view), dw, db, dp1, dp2, dbeta]


def self_check(like_x: Tensor) -> str | None:
    """Run the kernels on small seeded inputs with ``like_x``'s device, dtype and memory format against
    :func:`_reference`: batch statistics, a per-sample β with a spatial-mean gradient, running statistics."""
    with torch.autocast(like_x.device.type, enabled=False):
        g = torch.Generator().manual_seed(1)
        c, to = 5, dict(device=like_x.device, dtype=like_x.dtype)
        w, b = (
            (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(**to),
            torch.randn(c, generator=g).to(**to),
        )
        e = torch.randn(2, c, generator=g, dtype=torch.float64).to(**to)
        running = (torch.randn(c, generator=g).to(**to), (torch.rand(c, generator=g) + 0.5).to(**to))
        for case, per_sample, extra, stats in (
            ("batch", False, None, None),
            ("meta", True, e, None),
            ("eval", False, None, running),
        ):
            x, p1, p2, beta, dy = selfcheck.sample_inputs(like_x, per_sample)
            args = (x, w, b, p1, p2, beta, dy, extra, stats)
            reason = selfcheck.mismatch(_kernel_run(*args), _reference(*args), like_x.dtype, _CHECK_NAMES)
            if reason:
                return f"{case}: {reason}"
    return None


__all__ = ["backward_passes", "bn_acon_c", "bn_meta_acon_c", "self_check", "serves", "statistics"]
