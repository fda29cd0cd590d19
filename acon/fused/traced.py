"""ACON-C for traced code (``torch.compile``): the formula in forward, the fused backward kernel in backward.

Dynamo inlines this autograd Function into the joint graph. Forward is the fused ops' formula as plain
torch ops, so Inductor fuses it into the BatchNorm before it (one pass writes the activation). Backward
is the fused backward op (``acon::acon_c_backward``: the C++ kernels on CPU, Triton on CUDA), one pass
over x and dy that yields dx and the p1, p2, β sums. Autograd of the formula instead gave Inductor
several per-channel reductions whose loops do not share the pointwise loop, so it wrote the BatchNorm
output, σ and the gradient factors to memory and read each back (compiled ShuffleNetV2 1.0x step, batch 16,
112 px, one CPU thread: 1.37-1.46x compiled ReLU's time; this Function: 1.13x;
``benchmarks/cpu_2026-12-06_compiled_step.md``).

Memory: the min-cut partitioner keeps a tensor rather than recomputing it when an opaque op reads it in
backward ("materialized in backward"), which would keep x, the BatchNorm output, in every layer (1.36x
compiled ReLU's saved activations). The kernel therefore reads -x with -p1 and -p2: ACON-C is exactly
invariant under that change of sign ((p1 - p2)·x, p2·x and so σ's argument are unchanged, IEEE negation
and subtraction are sign-symmetric), dx, dp1 and dp2 come back negated and dβ unchanged, bit for bit.
The negation is a fusible pointwise op, so the partitioner recomputes x from the BatchNorm input and its
statistics (saved for BatchNorm's own backward anyway), as it does for ReLU.
"""

from __future__ import annotations

import torch

from acon.fused import cpu
from acon.fused.layout import compute_dtype, dense
from acon.fused.ops import acon_c_backward_op


def _channel_views(x: torch.Tensor, *params: torch.Tensor) -> list[torch.Tensor]:
    """Each (1 or N, C, 1, ...) parameter as a view broadcasting over x, in the compute dtype."""
    ct = compute_dtype(x.dtype)
    return [p.reshape(p.shape[:2] + (1,) * (x.dim() - 2)).to(ct) for p in params]


def formula(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The fused ops' forward formula as plain torch ops on x's shape (fp32, fp64 for fp64 x)."""
    return cpu.forward_math(x, *_channel_views(x, p1, p2, beta), compute_dtype(x.dtype))


class TracedAconC(torch.autograd.Function):
    """y = (p1 - p2)·x·σ(β(p1 - p2)·x) + p2·x: traced formula forward, fused-kernel backward."""

    @staticmethod
    def forward(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return formula(x, p1, p2, beta)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, p1, p2, beta = ctx.saved_tensors
        dx_neg, dp1_neg, dp2_neg, dbeta = acon_c_backward_op(dy, dense(-x), -p1, -p2, beta)
        return -dx_neg, -dp1_neg, -dp2_neg, dbeta


def traced_acon_c(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ACON-C for traced code: same values, gradients and NaN/±Inf convention as the fused ops."""
    return TracedAconC.apply(x, p1, p2, beta)
