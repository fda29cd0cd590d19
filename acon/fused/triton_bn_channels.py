"""The per-channel float64 kernels of the fused BatchNorm → ACON-C op (``acon.fused.triton_bn_kernels``
has the passes over x): combining the statistics' partial moments, the coefficient table the passes
read, and dx's coefficients after backward pass 1. Each is one launch over blocks of channels, where
the torch ops they replace would be a dozen small launches per BatchNorm (on a GPU, launch time)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from acon.fused.triton_kernels import launch_device

# rows of the per-channel coefficient table the passes read
MEAN, SCALE, SHIFT, P1, P2, DX_X = range(6)


@triton.jit
def _moments_combine_kernel(
    part_ptr, row_ptr, out_ptr, N, C, S, n_split, span, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # float64: the slices of each row, then the rows, merged by Chan's formula in a fixed order
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    plane = N * n_split * C
    mean = tl.zeros((BLOCK_C,), dtype=tl.float64)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    rows = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for n in range(0, N):
        row_sum = tl.zeros((BLOCK_C,), dtype=tl.float64)
        for sp in range(0, n_split):
            cnt = tl.minimum(tl.maximum(S - sp * span, 0), span).to(tl.float64)
            mu = tl.load(part_ptr + (n * n_split + sp) * C + c, mask=cm, other=0.0).to(tl.float64)
            row_sum += cnt * mu
        row_mean = row_sum / S
        row_m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
        for sp in range(0, n_split):
            cnt = tl.minimum(tl.maximum(S - sp * span, 0), span).to(tl.float64)
            at = (n * n_split + sp) * C + c
            mu = tl.load(part_ptr + at, mask=cm, other=0.0).to(tl.float64)
            dev = mu - row_mean
            row_m2 += tl.load(part_ptr + plane + at, mask=cm, other=0.0).to(tl.float64) + cnt * dev * dev
        tl.store(row_ptr + n * C + c, row_mean, mask=cm)
        rows += 1.0  # a float64 count: 1.0 / an integer would be fp32
        delta = row_mean - mean
        mean += delta / rows
        m2 += row_m2 + delta * delta * ((rows - 1.0) * S / rows)
    tl.store(out_ptr + c, mean, mask=cm)
    tl.store(out_ptr + C + c, m2 / (N * S), mask=cm)


@triton.jit
def _channel_block(C, BLOCK_C: tl.constexpr):
    """This program's channel indices and their mask."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C


@triton.jit
def _coefficients_kernel(
    mean_ptr, inv_ptr, w_ptr, b_ptr, p1_ptr, p2_ptr, coef_ptr, C,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    c, cm = _channel_block(C, BLOCK_C)
    ct = coef_ptr.dtype.element_ty
    a = tl.load(inv_ptr + c, mask=cm, other=0.0).to(tl.float64)
    if HAS_W:
        a = a * tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float64)
    b = tl.zeros((BLOCK_C,), dtype=tl.float64)
    if HAS_B:
        b += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float64)
    tl.store(coef_ptr + c, tl.load(mean_ptr + c, mask=cm, other=0.0).to(ct), mask=cm)
    tl.store(coef_ptr + C + c, a.to(ct), mask=cm)
    tl.store(coef_ptr + 2 * C + c, b.to(ct), mask=cm)
    tl.store(coef_ptr + 3 * C + c, tl.load(p1_ptr + c, mask=cm, other=0.0).to(ct), mask=cm)
    tl.store(coef_ptr + 4 * C + c, tl.load(p2_ptr + c, mask=cm, other=0.0).to(ct), mask=cm)
    tl.store(coef_ptr + 5 * C + c, tl.zeros((BLOCK_C,), dtype=ct), mask=cm)


@triton.jit
def _dx_coefficients_kernel(
    sums_ptr, coef_ptr, inv_ptr, dzbar_ptr, row_ptr, out_ptr, shift_ptr, bn_ptr, N, C, S, count,
    META: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # float64: BatchNorm's sums (with Meta-ACON's dzbar/S added to dz), then dx's coefficients
    c, cm = _channel_block(C, BLOCK_C)
    ct = coef_ptr.dtype.element_ty
    mean = tl.load(coef_ptr + c, mask=cm, other=0.0).to(tl.float64)
    a = tl.load(coef_ptr + C + c, mask=cm, other=0.0).to(tl.float64)
    inv = tl.load(inv_ptr + c, mask=cm, other=0.0).to(tl.float64)
    sdz = tl.load(sums_ptr + 3 * C + c, mask=cm, other=0.0)
    sdzx = tl.load(sums_ptr + 4 * C + c, mask=cm, other=0.0)
    if META:
        for n in range(0, N):
            g = tl.load(dzbar_ptr + n * C + c, mask=cm, other=0.0).to(tl.float64)
            sdz += g
            sdzx += g * (tl.load(row_ptr + n * C + c, mask=cm, other=0.0) - mean)
    tl.store(bn_ptr + c, sdz, mask=cm)
    tl.store(bn_ptr + C + c, sdzx * inv, mask=cm)
    for k in tl.static_range(5):
        tl.store(out_ptr + k * C + c, tl.load(coef_ptr + k * C + c, mask=cm, other=0.0), mask=cm)
    base = tl.zeros((BLOCK_C,), dtype=tl.float64)
    bx = tl.zeros((BLOCK_C,), dtype=tl.float64)
    if BATCH_STATS:
        base -= a * sdz / count
        bx -= a * inv * inv * sdzx / count
    tl.store(out_ptr + 5 * C + c, bx.to(ct), mask=cm)
    if META:
        for n in range(0, N):
            g = tl.load(dzbar_ptr + n * C + c, mask=cm, other=0.0).to(tl.float64)
            tl.store(shift_ptr + n * C + c, (a * g / S + base).to(ct), mask=cm)
    else:
        tl.store(shift_ptr + c, base.to(ct), mask=cm)


def combine_moments(part: Tensor, s: int, span: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel float64 (mean, biased variance) and per-(n, c) means from the (2, N, splits, C) slice
    means and Σ(x - mean)² of the statistics pass (each split spans ``span`` of the ``s`` values)."""
    _, n, n_split, c = part.shape
    row_mean = torch.empty((n, c), dtype=torch.float64, device=part.device)
    out = torch.empty((2, c), dtype=torch.float64, device=part.device)
    bc = min(triton.next_power_of_2(c), 128)
    with launch_device(part.device):
        _moments_combine_kernel[(triton.cdiv(c, bc),)](
            part, row_mean, out, n, c, s, n_split, span, BLOCK_C=bc
        )
    return out[0], out[1], row_mean


def coefficients(mean: Tensor, invstd: Tensor, weight, bias, p1: Tensor, p2: Tensor, ct) -> Tensor:
    """The (6, C) table the kernels read, in ``ct``: mean, a = invstd·weight (float64 product), bias, p1,
    p2, and dx's (x - mean) coefficient (0 until backward sets it). One launch."""
    c = mean.numel()
    coef = torch.empty((6, c), dtype=ct, device=mean.device)
    flat = [t.reshape(c).contiguous() for t in (mean, invstd, p1, p2)]
    w = weight.reshape(c).contiguous() if weight is not None else flat[1]
    b = bias.reshape(c).contiguous() if bias is not None else flat[1]
    bc = min(triton.next_power_of_2(c), 1024)
    with launch_device(mean.device):
        _coefficients_kernel[(triton.cdiv(c, bc),)](
            flat[0], flat[1], w, b, flat[2], flat[3], coef, c,
            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=bc,
        )  # fmt: skip
    return coef


def dx_coefficients(sums, coef, invstd, dzbar, row_mean, count: int, spatial: int, batch_stats: bool):
    """From pass 1's ``sums`` (and Meta-ACON's (N, C) ``dzbar``, z's spatial-mean gradient, added to dz as
    dzbar/S, S = ``spatial``): pass 2's coefficient table, its per-channel or per-(n, c) shift, and
    BatchNorm's float64 (Σdz, Σdz·x̂) = (dbias, dweight); the batch statistics spanned ``count`` values
    per channel (``batch_stats`` False: the running statistics, no batch terms). One launch."""
    c = coef.shape[1]
    meta = dzbar is not None
    n = dzbar.shape[0] if meta else 1
    out = torch.empty_like(coef)
    shift = torch.empty((n, c), dtype=coef.dtype, device=coef.device)
    bn = torch.empty((2, c), dtype=torch.float64, device=coef.device)
    rows = (dzbar.contiguous(), row_mean.contiguous()) if meta else (sums, sums)
    bc = min(triton.next_power_of_2(c), 1024)
    with launch_device(coef.device):
        _dx_coefficients_kernel[(triton.cdiv(c, bc),)](
            sums, coef, invstd.contiguous(), *rows, out, shift, bn, n, c, spatial, count,
            META=meta, BATCH_STATS=batch_stats, BLOCK_C=bc,
        )  # fmt: skip
    return out, shift, bn


__all__ = ["DX_X", "MEAN", "P1", "P2", "SCALE", "SHIFT", "coefficients", "combine_moments", "dx_coefficients"]
