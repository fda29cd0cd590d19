"""Triton kernels of the fused BatchNorm → ACON-C op (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

They work on the (N, C, S) view of a dense x (contiguous NCHW or channels-last, tiled as in
``acon.fused.triton_kernels``); the per-channel float64 steps between them are the kernels of
``acon.fused.triton_bn_channels``, and :mod:`acon.fused.triton_bn_act` strings both into the autograd op.

- statistics (:func:`moments`): per (sample, channel block, slice of S) program, the slice's mean and
  Σ(x - mean)², merged tile by tile by Chan's formula in fp32; slices and rows are then combined in
  float64, which also gives the per-(n, c) spatial means Meta-ACON's β network reads.
- forward (:func:`forward`): z = (x - mean)·a + b (a = invstd·weight) on load, ACON-C with a per-channel
  or per-sample β, y stored: one read of x, one write of y; z is never stored.
- backward pass 1 (:func:`backward_sums`): reads x and dy, recomputes z and ACON's gradient dz, and
  writes per-program partial sums of dp1's, dp2's (per channel) and dβ's (per sample and channel) terms
  and of BatchNorm's Σdz and Σdz·(x - mean); the partials are added in a fixed order in float64.
  With running statistics and no β network it also writes dx = a·dz, and no second pass runs.
- backward pass 2 (:func:`backward_dx`): reads x and dy again, recomputes dz in fp32 and writes
  dx = a·dz + B·(x - mean) + shift[n, c]. dz is never written: recomputing it costs one sigmoid per
  element and saves a tensor-sized write, its read and its buffer (five tensor passes instead of six).

No atomics; the split of S depends only on the shape, so results are bitwise deterministic. Loads and
stores use x's dtype (fp32, bf16, fp16, fp64); arithmetic is fp32 (fp64 for fp64 x). NaN and ±Inf in the
ACON part follow ``acon.fused.cpu``'s convention (masked lanes add exactly 0 to every sum).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from acon.fused.layout import compute_dtype, layout_of
from acon.fused.triton_bn_channels import combine_moments
from acon.fused.triton_kernels import TARGET_PROGRAMS, _blocks, _strides, launch_device


@triton.jit
def _program(C, n_cb, n_inner, BLOCK_C: tl.constexpr):
    """This program's sample (int64), channel indices and mask, and index along S (tile or split)."""
    pid = tl.program_id(0)
    n = (pid // (n_inner * n_cb)).to(tl.int64)
    c = (pid // n_inner) % n_cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, c, c < C, pid % n_inner


@triton.jit
def _acon_params(coef_ptr, b_ptr, n, b_sn, C, c, cm, ct):
    """mean, a, b, p1, p2 of the coefficient table (in the compute dtype) and β of sample n, as columns."""
    rows = coef_ptr + c
    mu, a = tl.load(rows, mask=cm, other=0.0), tl.load(rows + C, mask=cm, other=0.0)
    b, p1 = tl.load(rows + 2 * C, mask=cm, other=0.0), tl.load(rows + 3 * C, mask=cm, other=0.0)
    p2 = tl.load(rows + 4 * C, mask=cm, other=0.0)
    beta = tl.load(b_ptr + n * b_sn + c, mask=cm, other=0.0).to(ct)
    return mu[:, None], a[:, None], b[:, None], p1[:, None], p2[:, None], beta[:, None]


@triton.jit
def _moments_kernel(
    x_ptr, part_ptr, N, C, S, sn, sc, ss, n_cb, n_split, tiles_per_split,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, F64: tl.constexpr,
):  # fmt: skip
    ct = tl.float64 if F64 else tl.float32
    n, c, cm, sp = _program(C, n_cb, n_split, BLOCK_C)
    base = n * sn + c.to(tl.int64)[:, None] * sc
    mean = tl.zeros((BLOCK_C,), dtype=ct)
    m2 = tl.zeros((BLOCK_C,), dtype=ct)
    cnt = tl.zeros((BLOCK_C,), dtype=ct)
    for t in range(0, tiles_per_split):
        s = (sp * tiles_per_split + t) * BLOCK_S + tl.arange(0, BLOCK_S)
        sm = s < S
        m = cm[:, None] & sm[None, :]
        x = tl.load(x_ptr + base + s.to(tl.int64)[None, :] * ss, mask=m, other=0.0).to(ct)
        k = tl.sum(sm.to(ct), axis=0)
        tile_mean = tl.sum(x, axis=1) / tl.maximum(k, 1.0)
        dev = tl.where(m, x - tile_mean[:, None], 0.0)
        total = cnt + k
        frac = k / tl.maximum(total, 1.0)
        delta = tile_mean - mean
        mean += delta * frac
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * cnt * frac
        cnt = total
    out = (n * n_split + sp) * C + c
    tl.store(part_ptr + out, mean, mask=cm)
    tl.store(part_ptr + N * n_split * C + out, m2, mask=cm)


@triton.jit
def _fwd_kernel(
    x_ptr, y_ptr, coef_ptr, b_ptr, C, S, sn, sc, ss, b_sn, n_cb, n_sb,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, F64: tl.constexpr,
):  # fmt: skip
    ct = tl.float64 if F64 else tl.float32
    n, c, cm, sb = _program(C, n_cb, n_sb, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    m = cm[:, None] & (s < S)[None, :]
    mu, a, b, p1, p2, beta = _acon_params(coef_ptr, b_ptr, n, b_sn, C, c, cm, ct)
    off = n * sn + c.to(tl.int64)[:, None] * sc + s.to(tl.int64)[None, :] * ss
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(ct)
    z = (x - mu) * a + b
    u = (p1 - p2) * z
    y = u * tl.sigmoid(beta * u) + p2 * z
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, coef_ptr, b_ptr, e_ptr, part_ptr,
    N, C, S, sn, sc, ss, b_sn, e_sn, n_cb, n_split, tiles_per_split,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, F64: tl.constexpr,
    SUMS: tl.constexpr, WRITE_DX: tl.constexpr, BATCH_STATS: tl.constexpr,
):  # fmt: skip
    ct = tl.float64 if F64 else tl.float32
    n, c, cm, sp = _program(C, n_cb, n_split, BLOCK_C)
    mu, a, b, p1, p2, beta = _acon_params(coef_ptr, b_ptr, n, b_sn, C, c, cm, ct)
    bx = tl.load(coef_ptr + 5 * C + c, mask=cm, other=0.0)[:, None]
    e = tl.load(e_ptr + n * e_sn + c, mask=cm, other=0.0).to(ct)[:, None]
    d = p1 - p2
    acc1 = tl.zeros((BLOCK_C, BLOCK_S), dtype=ct)
    acc2 = tl.zeros((BLOCK_C, BLOCK_S), dtype=ct)
    accb = tl.zeros((BLOCK_C, BLOCK_S), dtype=ct)
    accd = tl.zeros((BLOCK_C, BLOCK_S), dtype=ct)
    accx = tl.zeros((BLOCK_C, BLOCK_S), dtype=ct)
    base = n * sn + c.to(tl.int64)[:, None] * sc
    for t in range(0, tiles_per_split):
        s = (sp * tiles_per_split + t) * BLOCK_S + tl.arange(0, BLOCK_S)
        m = cm[:, None] & (s < S)[None, :]
        off = base + s.to(tl.int64)[None, :] * ss
        xc = tl.load(x_ptr + off, mask=m, other=0.0).to(ct) - mu
        dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(ct)
        z = xc * a + b
        u = d * z
        w = beta * u
        sg = tl.sigmoid(w)
        sgp = sg * (1.0 - sg)
        g = sg + w * sgp
        dz = dy * (d * g + p2)
        if WRITE_DX:
            dx = a * dz + e
            if BATCH_STATS:
                dx += bx * xc
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if SUMS:
            # masked lanes add exactly 0 (their terms may be 0·NaN where a parameter is ±inf)
            gz = dy * z
            acc1 += tl.where(m, gz * g, 0.0)
            acc2 += tl.where(m, gz * (1.0 - g), 0.0)
            accb += tl.where(m, dy * u * (u * sgp), 0.0)  # u·σ'(w) first: u² may overflow where that is 0
            accd += tl.where(m, dz, 0.0)
            accx += tl.where(m, dz * xc, 0.0)
    if SUMS:
        out = (n * n_split + sp) * C + c
        plane = N * n_split * C
        tl.store(part_ptr + out, tl.sum(acc1, axis=1), mask=cm)
        tl.store(part_ptr + plane + out, tl.sum(acc2, axis=1), mask=cm)
        tl.store(part_ptr + 2 * plane + out, tl.sum(accb, axis=1), mask=cm)
        tl.store(part_ptr + 3 * plane + out, tl.sum(accd, axis=1), mask=cm)
        tl.store(part_ptr + 4 * plane + out, tl.sum(accx, axis=1), mask=cm)


@dataclasses.dataclass
class Grid:
    """How x is tiled: its (N, C, S) view and strides, the tile, and the split of S for the reducing
    passes (about TARGET_PROGRAMS programs, at least one tile each)."""

    n: int
    c: int
    s: int
    strides: tuple[int, int, int]
    block_c: int
    block_s: int
    n_cb: int
    tiles: int
    per_split: int
    n_split: int

    @classmethod
    def of(cls, x: Tensor, split: bool = True) -> Grid:
        """The tiling of dense ``x``; ``split=False``: one tile per program (the element-wise passes)."""
        layout = layout_of(x)
        n, c, s, sn, sc, ss = _strides(x, layout)
        bc, bs = _blocks(layout, c, s)
        n_cb, tiles = triton.cdiv(c, bc), max(1, triton.cdiv(s, bs))
        n_split = min(tiles, max(1, triton.cdiv(TARGET_PROGRAMS, max(1, n * n_cb)))) if split else tiles
        per_split = triton.cdiv(tiles, n_split)
        return cls(n, c, s, (sn, sc, ss), bc, bs, n_cb, tiles, per_split, triton.cdiv(tiles, per_split))

    def programs(self) -> int:
        return self.n * self.n_cb * self.n_split

    def common(self) -> tuple:
        return (self.n, self.c, self.s, *self.strides)

    def blocks(self, x: Tensor) -> dict:
        return dict(BLOCK_C=self.block_c, BLOCK_S=self.block_s, F64=x.dtype == torch.float64)


def moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance of dense (N, C, ...) x, and its per-(n, c) spatial means, all
    float64 (fp32 within each slice of S, slices and rows combined by Chan's formula in float64)."""
    gr = Grid.of(x)
    ct = compute_dtype(x.dtype)
    part = torch.empty((2, gr.n, gr.n_split, gr.c), dtype=ct, device=x.device)
    with launch_device(x.device):
        _moments_kernel[(gr.programs(),)](
            x, part, *gr.common(), gr.n_cb, gr.n_split, gr.per_split, **gr.blocks(x)
        )  # fmt: skip
    return combine_moments(part, gr.s, gr.per_split * gr.block_s)


def _flat(t: Tensor, c: int) -> tuple[Tensor, int]:
    """A per-channel or per-sample (·, C) tensor flattened to rows of C, and its row stride (0 if one row)."""
    t = t.reshape(-1, c).contiguous()
    return t, (c if t.shape[0] > 1 else 0)


def forward(x: Tensor, coef: Tensor, beta: Tensor) -> Tensor:
    """y = ACON-C((x - mean)·a + b) with x's strides and dtype; β per channel or per sample."""
    gr = Grid.of(x, split=False)
    y = torch.empty_like(x)
    bf, b_sn = _flat(beta.to(coef.dtype), gr.c)
    with launch_device(x.device):
        _fwd_kernel[(gr.programs(),)](
            x, y, coef, bf, gr.c, gr.s, *gr.strides, b_sn, gr.n_cb, gr.n_split, **gr.blocks(x)
        )  # fmt: skip
    return y


def backward_sums(dy: Tensor, x: Tensor, coef: Tensor, beta: Tensor, eval_dx: bool = False):
    """Pass 1: (5, C) float64 sums (Σdy·z·g → dp1, Σdy·z·(1-g) → dp2, -, Σdz, Σdz·(x - mean)), dβ's (N, C)
    sums, and with ``eval_dx`` dx = a·dz (running statistics, no β network), else None. The partial
    sums are added in a fixed order, so the results are deterministic."""
    gr = Grid.of(x)
    bf, b_sn = _flat(beta.to(coef.dtype), gr.c)
    part = torch.empty((5, gr.n, gr.n_split, gr.c), dtype=coef.dtype, device=x.device)
    dx = torch.empty_like(x) if eval_dx else None
    with launch_device(x.device):
        _bwd_kernel[(gr.programs(),)](
            dy, x, dx if eval_dx else x, coef, bf, coef.new_zeros(gr.c), part,
            *gr.common(), b_sn, 0, gr.n_cb, gr.n_split, gr.per_split, **gr.blocks(x),
            SUMS=True, WRITE_DX=eval_dx, BATCH_STATS=False,
        )  # fmt: skip
    return part.sum((1, 2), dtype=torch.float64), part[2].sum(1, dtype=torch.float64), dx


def backward_dx(
    dy: Tensor, x: Tensor, coef: Tensor, beta: Tensor, shift: Tensor, batch_stats: bool
) -> Tensor:
    """Pass 2: dx = a·dz + coef[DX_X]·(x - mean) (batch statistics) + ``shift`` (per channel or (n, c))."""
    gr = Grid.of(x, split=False)
    bf, b_sn = _flat(beta.to(coef.dtype), gr.c)
    ef, e_sn = _flat(shift.to(coef.dtype), gr.c)
    dx = torch.empty_like(x)
    with launch_device(x.device):
        _bwd_kernel[(gr.programs(),)](
            dy, x, dx, coef, bf, ef, coef, *gr.common(), b_sn, e_sn, gr.n_cb, gr.n_split, gr.per_split,
            **gr.blocks(x), SUMS=False, WRITE_DX=True, BATCH_STATS=batch_stats,
        )  # fmt: skip
    return dx


__all__ = ["Grid", "backward_dx", "backward_sums", "forward", "moments"]
