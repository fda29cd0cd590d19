"""Triton forward/backward kernels for ACON-C (GPU; also runs on CPU tensors under TRITON_INTERPRET=1).

x is viewed as (N, C, S) with strides (sn, sc, ss): contiguous NCHW has ss = 1, channels_last has
sc = 1; Triton specialises the unit stride, so loads are coalesced along whichever axis is contiguous.
Loads and stores use x's dtype (bf16, fp16, fp32, fp64); arithmetic is fp32 (fp64 for fp64 inputs).
NaN and ±Inf propagate as in the torch formulas of ``acon.fused.cpu`` (its docstring has the convention).

Backward is one pass over x and dy: each program owns (sample n, a block of channels, a fixed slice of
S), writes dx for its tile and its partial sums for dp1, dp2 and dβ into an (N, SPLIT, C) fp32 buffer.
The buffers are reduced by ``torch.sum`` afterwards. No atomics are used, and the split depends only on
the shape, so the gradients are bitwise deterministic run to run.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from acon.fused.layout import NCS, as_3d, layout_of

TILE = 2048  # elements per program tile
TARGET_PROGRAMS = 1024  # backward: split S until about this many programs run


@triton.jit
def _load_params(p1_ptr, p2_ptr, b_ptr, n, c, cm, b_sn, F64: tl.constexpr):
    ct = tl.float64 if F64 else tl.float32
    p1 = tl.load(p1_ptr + c, mask=cm, other=0.0).to(ct)
    p2 = tl.load(p2_ptr + c, mask=cm, other=0.0).to(ct)
    beta = tl.load(b_ptr + n * b_sn + c, mask=cm, other=0.0).to(ct)
    return p1, p2, beta


@triton.jit
def _acon_c_fwd_kernel(
    x_ptr, y_ptr, p1_ptr, p2_ptr, b_ptr, C, S, sn, sc, ss, b_sn, n_cb, n_sb,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, F64: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    sb = pid % n_sb
    cb = (pid // n_sb) % n_cb
    n = (pid // (n_sb * n_cb)).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    cm = c < C
    m = cm[:, None] & (s < S)[None, :]
    p1, p2, beta = _load_params(p1_ptr, p2_ptr, b_ptr, n, c, cm, b_sn, F64)
    off = n * sn + c.to(tl.int64)[:, None] * sc + s.to(tl.int64)[None, :] * ss
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(p1.dtype)
    u = (p1 - p2)[:, None] * x
    y = u * tl.sigmoid(beta[:, None] * u) + p2[:, None] * x
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _acon_c_bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, p1_ptr, p2_ptr, b_ptr, part_ptr,
    N, C, S, sn, sc, ss, b_sn, n_cb, n_split, tiles_per_split,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, F64: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    sp = pid % n_split
    cb = (pid // n_split) % n_cb
    n = (pid // (n_split * n_cb)).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    p1, p2, beta = _load_params(p1_ptr, p2_ptr, b_ptr, n, c, cm, b_sn, F64)
    d = (p1 - p2)[:, None]
    b2 = beta[:, None]
    acc1 = tl.zeros((BLOCK_C, BLOCK_S), dtype=p1.dtype)
    acc2 = tl.zeros((BLOCK_C, BLOCK_S), dtype=p1.dtype)
    accb = tl.zeros((BLOCK_C, BLOCK_S), dtype=p1.dtype)
    base = n * sn + c.to(tl.int64)[:, None] * sc
    for t in range(0, tiles_per_split):
        s = (sp * tiles_per_split + t) * BLOCK_S + tl.arange(0, BLOCK_S)
        m = cm[:, None] & (s < S)[None, :]
        off = base + s.to(tl.int64)[None, :] * ss
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(p1.dtype)
        dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(p1.dtype)
        u = d * x
        z = b2 * u
        sg = tl.sigmoid(z)
        sgp = sg * (1.0 - sg)
        g = sg + z * sgp
        tl.store(dx_ptr + off, (dy * (d * g + p2[:, None])).to(dx_ptr.dtype.element_ty), mask=m)
        gx = dy * x
        # masked lanes (x = dy = 0) add exactly 0: their terms are 0·NaN where β or p1 - p2 is ±inf
        acc1 += tl.where(m, gx * g, 0.0)
        acc2 += tl.where(m, gx * (1.0 - g), 0.0)
        accb += tl.where(m, dy * u * (u * sgp), 0.0)  # u·σ'(z) first: u² may overflow where that is 0
    out = (n * n_split + sp) * C + c
    plane = N * n_split * C
    tl.store(part_ptr + out, tl.sum(acc1, axis=1), mask=cm)
    tl.store(part_ptr + plane + out, tl.sum(acc2, axis=1), mask=cm)
    tl.store(part_ptr + 2 * plane + out, tl.sum(accb, axis=1), mask=cm)


def _blocks(layout: str, c: int, s: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): a ~TILE-element tile, long along the contiguous axis (at least 1 × 1: an empty
    axis would give a zero-size block)."""
    c, s = max(c, 1), max(s, 1)
    if layout == NCS:
        bs = min(triton.next_power_of_2(s), TILE)
        return max(1, min(triton.next_power_of_2(c), TILE // bs)), bs
    bc = min(triton.next_power_of_2(c), 256)
    return bc, max(1, min(triton.next_power_of_2(s), TILE // bc))


def _strides(x: torch.Tensor, layout: str) -> tuple[int, int, int, int, int]:
    """(N, C, S, sn, sc, ss) of the 3-D view in (N, C, S) index order."""
    x3 = as_3d(x, layout)
    if layout == NCS:
        (n, c, s), (sn, sc, ss) = x3.shape, x3.stride()
    else:
        (n, s, c), (sn, ss, sc) = x3.shape, x3.stride()
    return n, c, s, sn, sc, ss


def _flat_params(p1, p2, beta, c):
    return p1.reshape(c).contiguous(), p2.reshape(c).contiguous(), beta.reshape(-1, c).contiguous()


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch in: ``torch.cuda.device(device)`` for a CUDA tensor (Triton launches on the
    current CUDA device, not on the tensors' device), nothing otherwise."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_tensor_device(fn):
    """Run ``fn`` (its first argument a tensor) with its kernels launched on that tensor's device."""

    @functools.wraps(fn)
    def launch(first: torch.Tensor, *args):
        with launch_device(first.device):
            return fn(first, *args)

    return launch


@_on_tensor_device
def forward(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ACON-C forward for a dense (contiguous or channels-last) x; output has x's strides and dtype."""
    layout = layout_of(x)
    n, c, s, sn, sc, ss = _strides(x, layout)
    p1f, p2f, bf = _flat_params(p1, p2, beta, c)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    bc, bs = _blocks(layout, c, s)
    n_cb, n_sb = triton.cdiv(c, bc), triton.cdiv(s, bs)
    b_sn = c if bf.shape[0] > 1 else 0
    _acon_c_fwd_kernel[(n * n_cb * n_sb,)](
        x, y, p1f, p2f, bf, c, s, sn, sc, ss, b_sn, n_cb, n_sb,
        BLOCK_C=bc, BLOCK_S=bs, F64=x.dtype == torch.float64,
    )  # fmt: skip
    return y


@_on_tensor_device
def backward(dy: torch.Tensor, x: torch.Tensor, p1, p2, beta):
    """(dx with x's strides, Σ for dp1 (C,), Σ for dp2 (C,), Σ for dβ (N, C)); dy must share x's strides."""
    layout = layout_of(x)
    n, c, s, sn, sc, ss = _strides(x, layout)
    p1f, p2f, bf = _flat_params(p1, p2, beta, c)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.empty_like(x)
    bc, bs = _blocks(layout, c, s)
    n_cb, tiles = triton.cdiv(c, bc), max(1, triton.cdiv(s, bs))
    n_split = min(tiles, max(1, triton.cdiv(TARGET_PROGRAMS, max(1, n * n_cb))))
    per_split = triton.cdiv(tiles, n_split)
    n_split = triton.cdiv(tiles, per_split)
    part = torch.zeros((3, n, n_split, c), dtype=ct, device=x.device)
    if x.numel() > 0:
        b_sn = c if bf.shape[0] > 1 else 0
        _acon_c_bwd_kernel[(n * n_cb * n_split,)](
            dy, x, dx, p1f, p2f, bf, part, n, c, s, sn, sc, ss, b_sn, n_cb, n_split, per_split,
            BLOCK_C=bc, BLOCK_S=bs, F64=x.dtype == torch.float64,
        )  # fmt: skip
    return dx, part[0].sum((0, 1)), part[1].sum((0, 1)), part[2].sum(1)
