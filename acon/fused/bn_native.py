"""Python side of the single-pass BatchNorm → ACON-C row kernels (``bn_acon_cpu.h``) of ``acon.fused.bn_act``.

They live in the library of ``acon.fused.native`` (built and loaded there) and serve contiguous fp32/bf16
x (N, C, S...) whose spatial size S holds at least one vector of the kernels.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from acon.fused.layout import NCS
from acon.fused.native import DTYPES, _blocks, _flat32, _grad_buffer, library, vector_width


def rows_serve(x: torch.Tensor) -> bool:
    """Whether the BatchNorm + ACON-C row kernels serve ``x``: a non-empty contiguous fp32 or bf16 CPU tensor
    (N, C, ...) whose rows (the spatial values of one sample and channel) hold at least one vector."""
    if (
        x.device.type != "cpu"
        or x.dtype not in DTYPES
        or x.dim() < 3
        or x.numel() == 0
        or not x.is_contiguous()
    ):
        return False
    lanes = vector_width()
    return lanes is not None and x.numel() // (x.shape[0] * x.shape[1]) >= lanes


def _rows(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(N, C, S, work blocks, threads) of a row-kernel call."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    threads = torch.get_num_threads()
    return n, c, s, _blocks(NCS, n, c, s, threads), threads


@functools.cache
def _bn_entry(lib: ctypes.CDLL, kind: str, dtype: torch.dtype):
    return getattr(lib, f"{kind}_ncs_{DTYPES[dtype]}")


def _bn_kernel(kind: str, dtype: torch.dtype):
    return _bn_entry(library(), kind, dtype)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def bn_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 per-row means (N, C), per-channel means and biased variances (C,) of ``x`` in one pass."""
    n, c, s, blocks, threads = _rows(x)
    out = torch.empty(n * c + 2 * c, dtype=torch.float64)
    row_mean, mean, var = out[: n * c], out[n * c : n * c + c], out[n * c + c :]
    _bn_kernel("bn_moments", x.dtype)(
        x.data_ptr(), row_mean.data_ptr(), mean.data_ptr(), var.data_ptr(), n, c, s, blocks, threads
    )
    return row_mean.view(n, c), mean, var


def bn_acon_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    beta: torch.Tensor,
) -> torch.Tensor:
    """ACON-C(scale·x + shift) in one pass (the normalised value is never written); scale, shift, p1, p2
    hold C values, β C or N·C (per sample)."""
    n, c, s, blocks, threads = _rows(x)
    y = torch.empty_like(x)
    params = [_flat32(p) for p in (scale, shift, p1, p2, beta)]
    _bn_kernel("bn_acon_fwd", x.dtype)(
        x.data_ptr(), y.data_ptr(), *(p.data_ptr() for p in params),
        n, c, s, int(params[4].numel() > c), blocks, threads,
    )  # fmt: skip
    return y


def bn_acon_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    mean: torch.Tensor,
    out_scale: torch.Tensor | None,
    p1: torch.Tensor,
    p2: torch.Tensor,
    beta: torch.Tensor,
):
    """One pass over x and dy (contiguous, x's shape): dz = ∂y/∂z·dy at z = scale·x + shift, written times
    ``out_scale`` (per channel; None: 1); the fp32 gradients of p1, p2, β (their shapes); and float64 Σdz
    then Σdz·(x - mean) per channel (2·C values), of dz before ``out_scale``."""
    n, c, s, blocks, threads = _rows(x)
    dz = torch.empty_like(x)
    g1, g2, gb = _grad_buffer(p1), _grad_buffer(p2), _grad_buffer(beta)
    sums = torch.empty(2 * c, dtype=torch.float64)
    params = [_flat32(p) for p in (scale, shift, mean)]
    params += [None if out_scale is None else _flat32(out_scale)] + [_flat32(p) for p in (p1, p2, beta)]
    _bn_kernel("bn_acon_bwd", x.dtype)(
        dy.data_ptr(), x.data_ptr(), dz.data_ptr(), g1.data_ptr(), g2.data_ptr(), gb.data_ptr(),
        sums.data_ptr(), sums[c:].data_ptr(), *(_ptr(p) for p in params),
        n, c, s, int(params[6].numel() > c), blocks, threads,
    )  # fmt: skip
    return dz, g1, g2, gb, sums


def bn_input_grad_(
    dz: torch.Tensor,
    x: torch.Tensor | None,
    means: torch.Tensor | None,
    row_grad: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """BatchNorm's input gradient in place over ``dz`` (contiguous): torch's (dz - G - (x - mean)·k)·scale
    with G and k/invstd² the float64 ``means`` of dz and of dz·(x - mean) (2·C values); eval BatchNorm
    (``x`` None): scale·dz. ``row_grad`` (float64, N·C), if any, is added to every dz of its row first."""
    n, c, s, blocks, threads = _rows(dz)
    params = [_flat32(p) for p in (mean, invstd, scale)]
    _bn_kernel("bn_input_grad", dz.dtype)(
        dz.data_ptr(), _ptr(x), _ptr(means), _ptr(row_grad), *(p.data_ptr() for p in params),
        n, c, s, blocks, threads,
    )  # fmt: skip
    return dz


def finishes_statistics(*tensors: torch.Tensor | None) -> bool:
    """Whether :func:`bn_finish_stats` takes these running buffers and affine parameters: fp32 contiguous
    CPU tensors, or None."""
    return all(
        t is None or (t.dtype == torch.float32 and t.is_contiguous() and not t.is_cuda) for t in tensors
    )


def bn_finish_stats(
    mean: torch.Tensor,
    var: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    unbias: float,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """(4, C) fp32: per-channel mean, 1/std, scale = weight/std, shift = bias - mean·scale, from the float64
    ``mean`` and biased ``var``; the running statistics (None: left alone) move by ``momentum`` towards the
    mean and ``unbias``·var, in place, as ``nn.BatchNorm2d``'s. See :func:`finishes_statistics`."""
    c = mean.shape[0]
    out = torch.empty(4, c)
    library().bn_finish_stats(
        mean.data_ptr(), var.data_ptr(), _ptr(running_mean), _ptr(running_var), momentum, unbias, eps,
        _ptr(weight), _ptr(bias), out.data_ptr(), c,
    )  # fmt: skip
    return out
