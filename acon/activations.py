"""ACON activation modules: ReLU, Swish/ACON-A, ACON-B, ACON-C and Meta-ACON-C.

Every module takes ``channels`` first. Per-channel parameters are stored as (1, C, 1, 1), the layout
of the authors' released checkpoints, and are reshaped to the input's rank (2-D, 3-D or 4-D) at call
time. Under autocast the parameters are cast to the input's dtype so a bf16/fp16 activation tensor
stays bf16/fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from acon import fused
from acon.functional import (
    acon_c_reference,
    channel_view,
    check_channels,
    scripted_channel_view,
    scripted_spatial_mean,
    spatial_mean,
    swish_reference,
)
from acon.fused import meta_native
from acon.fused.layout import dense
from acon.fused.ops import NativeAconC, native_plan

IMPLS = ("auto", "reference", "fused")


def _check_fused_shapes(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> None:
    """The checks of the fused path, with the modules' channel-count error first."""
    check_channels(x, p1.shape[1])
    fused.check_shapes(x, p1, p2, beta)


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    return impl


def _acon_c(
    x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor, impl: str
) -> torch.Tensor:
    """ACON-C on parameters as the modules hold them ((1, C, 1, 1); β also (N, C, 1, 1)): a fused kernel
    when one serves x (see ``acon.fused``), else the reference form. The C++ kernels' case comes first, as
    one cached lookup that checks shapes once per geometry (the checks run on every call cost about 30 µs
    per forward)."""
    if impl != "reference":
        plan = native_plan(x, p1, p2, beta, _check_fused_shapes)
        if plan is not None:
            return NativeAconC.apply(x, p1, p2, beta, plan)
    check_channels(x, p1.shape[1])
    if impl != "reference" and fused.available(x, impl):
        return fused.acon_c(x, p1, p2, beta)
    return acon_c_reference(x, channel_view(p1, x), channel_view(p2, x), channel_view(beta, x))


class ReLU(nn.ReLU):
    """ReLU with the suite's ``(channels, ...)`` signature; ``channels`` is ignored."""

    def __init__(self, channels: int | None = None, inplace: bool = False) -> None:
        super().__init__(inplace=inplace)


class Swish(nn.Module):
    """Swish x·σ(βx); with a learnable per-channel β (the default) this is ACON-A."""

    def __init__(self, channels: int, learnable_beta: bool = True) -> None:
        super().__init__()
        self.channels, self.learnable_beta = channels, learnable_beta
        beta = torch.ones(1, channels, 1, 1)
        if learnable_beta:
            self.beta = nn.Parameter(beta)
        else:
            self.register_buffer("beta", beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return swish_reference(x, scripted_channel_view(self.beta, x))
        return swish_reference(x, channel_view(self.beta, x))

    def extra_repr(self) -> str:
        return f"{self.channels}, learnable_beta={self.learnable_beta}"


class AconA(Swish):
    """ACON-A: the smooth maximum of x and 0, i.e. Swish with a learnable per-channel β."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, learnable_beta=True)


class AconC(nn.Module):
    """ACON-C: (p1 - p2)·x·σ(β(p1 - p2)·x) + p2·x with learnable per-channel p1, p2, β."""

    def __init__(self, channels: int, impl: str = "auto") -> None:
        super().__init__()
        self.channels = channels
        self.impl = _check_impl(impl)
        self.p1 = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript: the reference form (the fused op is not scriptable)
            p1, p2 = scripted_channel_view(self.p1, x), scripted_channel_view(self.p2, x)
            return acon_c_reference(x, p1, p2, scripted_channel_view(self.beta, x))
        return _acon_c(x, self.p1, self.p2, self.beta, self.impl)

    def extra_repr(self) -> str:
        return f"{self.channels}, impl={self.impl!r}"


class AconB(nn.Module):
    """ACON-B, the smooth PReLU: (1 - p)·x·σ(β(1 - p)·x) + p·x."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.p = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            p, beta = scripted_channel_view(self.p, x), scripted_channel_view(self.beta, x)
        else:
            p, beta = channel_view(self.p, x), channel_view(self.beta, x)
        return acon_c_reference(x, torch.ones_like(p), p, beta)

    def extra_repr(self) -> str:
        return str(self.channels)


class BatchNorm2dB1(nn.BatchNorm2d):
    """BatchNorm2d that, in training mode, falls back to running statistics when it sees one value
    per channel (batch size 1 after global pooling), instead of raising. Running stats are then left
    untouched. State-dict keys are those of ``nn.BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript cannot call super(): batch_norm spelled out
            use_batch = self.training and x.numel() // x.shape[1] > 1
            momentum = 0.1 if self.momentum is None else self.momentum
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, use_batch, momentum, self.eps
            )
        if self.training and self.track_running_stats and x.numel() // x.shape[1] <= 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)

    def forward_rows(self, h: torch.Tensor) -> torch.Tensor:
        """``self(h.view(N, C, 1, 1)).flatten(1)`` for (N, C) features, as one ATen call: the same statistics,
        running-statistics updates (momentum or cumulative average, unbiased variance, ``num_batches_tracked``)
        and batch-size-1 fallback, without the module call, the views and ``F.batch_norm``'s wrapper."""
        return torch.batch_norm(h, *self.rows_args(h.shape[0]), _cudnn())

    def rows_args(self, n: int) -> tuple:
        """The arguments after the input that ``torch.batch_norm`` takes for a call on ``n`` rows (weight, bias,
        running mean, running variance, use batch statistics, momentum, eps), with the bookkeeping of that
        call done: ``num_batches_tracked`` advanced, batch-size-1 fallback, the error for batch statistics of
        one row."""
        bufs, params = self._buffers, self._parameters  # not attribute access: several times faster
        rm, rv, track = bufs.get("running_mean"), bufs.get("running_var"), self.track_running_stats
        weight, bias = params.get("weight"), params.get("bias")
        if self.training and track and n <= 1:
            return weight, bias, rm, rv, False, 0.0, self.eps
        factor = 0.0 if self.momentum is None else self.momentum
        tracked = bufs.get("num_batches_tracked")
        if self.training and track and tracked is not None:
            tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(tracked)
        use_batch = self.training or (rm is None and rv is None)
        if self.training and not track:
            rm = rv = None
        if use_batch and n <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {(n, self.num_features)}"
            )
        return weight, bias, rm, rv, use_batch, factor, self.eps


def _cudnn() -> bool:
    return torch.backends.cudnn.enabled  # what F.batch_norm passes


def _has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` would run hooks (its own or global, forward or backward) besides ``m.forward``."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or _nn_module._global_forward_hooks
        or _nn_module._global_forward_pre_hooks
        or _nn_module._global_backward_hooks
        or _nn_module._global_backward_pre_hooks
    )


def _plain_batchnorm(bn: nn.Module) -> bool:
    """Whether ``bn`` is Meta-ACON's own BatchNorm2dB1, not swapped (e.g. for SyncBatchNorm) and without hooks."""
    return type(bn) is BatchNorm2dB1 and not _has_hooks(bn)


def _batch_norm_rows(bn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``bn`` applied to (N, C) features: :meth:`BatchNorm2dB1.forward_rows` for the module's own BatchNorm,
    else (a SyncBatchNorm or other swap, or one with hooks) the module itself on the (N, C, 1, 1) view."""
    if _plain_batchnorm(bn):
        return bn.forward_rows(h)
    return bn(h.view(h.shape[0], -1, 1, 1)).flatten(1)


def _pointwise(conv: nn.Conv2d, v: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution applied to (N, C) features, as a matrix product on the conv's parameters."""
    return F.linear(v, conv.weight.flatten(1), conv.bias)


class MetaAconC(nn.Module):
    """Meta-ACON-C: ACON-C whose β = σ(bn2(fc2(bn1(fc1(mean_HW(x)))))) is generated per sample and channel.

    fc1/fc2 are 1×1 convs with bias, hidden width max(r, C // r), no nonlinearity between them; the
    state-dict keys (p1, p2, fc1.*, bn1.*, fc2.*, bn2.*) are those of the authors' module.

    Batch size 1: in eval mode the β network's BatchNorms use their running statistics, as usual. In
    training mode a batch of one sample has a single value per channel after pooling, which
    ``nn.BatchNorm2d`` rejects (the authors' module crashes there). Here the BatchNorms then normalise
    with their running statistics instead and leave them (and ``num_batches_tracked``) untouched, so
    the output equals the eval-mode output and gradients still reach every parameter. Batches of two
    or more samples use batch statistics and update the running ones, exactly like ``nn.BatchNorm2d``.
    """

    def __init__(self, channels: int, r: int = 16, impl: str = "auto") -> None:
        super().__init__()
        hidden = max(r, channels // r)
        self.channels, self.r = channels, r
        self.impl = _check_impl(impl)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.bn1 = BatchNorm2dB1(hidden)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)
        self.bn2 = BatchNorm2dB1(channels)
        self.p1 = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, channels, 1, 1))

    def generate_beta(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample, per-channel β in (0, 1), shaped (N, C, 1, ..., 1) like ``x``.

        fc1 and fc2 act on 1×1 maps, so they run as matrix products on their own weights and the BatchNorms
        on the (N, C) rows (a convolution or module call costs far more here)."""
        check_channels(x, self.channels)
        return self.beta_from_mean(spatial_mean(x), x)

    def beta_from_mean(self, mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """:meth:`generate_beta` from the (N, C) spatial mean of ``x`` (shape and dtype taken from x)."""
        beta = self._beta_rows(mean).view(x.shape[:2] + (1,) * (x.dim() - 2))
        return beta if beta.dtype == x.dtype else beta.to(x.dtype)

    def _beta_rows(self, mean: torch.Tensor) -> torch.Tensor:
        """β as (N, C) rows, in the β network's dtype."""
        h = _batch_norm_rows(self.bn1, _pointwise(self.fc1, mean))
        return torch.sigmoid(_batch_norm_rows(self.bn2, _pointwise(self.fc2, h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript: the reference form (the fused op is not scriptable)
            n = x.shape[0]
            h = self.bn1(self.fc1(scripted_spatial_mean(x).view(n, -1, 1, 1)))
            beta = torch.sigmoid(self.bn2(self.fc2(h)))
            p1, p2 = scripted_channel_view(self.p1, x), scripted_channel_view(self.p2, x)
            return acon_c_reference(x, p1, p2, scripted_channel_view(beta, x))
        params = meta_native.served_params(self, x) if self.impl != "reference" else None
        if params is not None:  # the C++ kernels serve x: one op for the mean, β network and ACON-C
            check_channels(x, self.channels)
            return meta_native.meta_acon_c(self, dense(x), params)
        return _acon_c(x, self.p1, self.p2, self.generate_beta(x), self.impl)

    def _plain_batchnorms(self) -> bool:
        """Whether bn1 and bn2 are this module's own BatchNorm2dB1, without hooks (the one-op path applies)."""
        return _plain_batchnorm(self._modules["bn1"]) and _plain_batchnorm(self._modules["bn2"])

    def extra_repr(self) -> str:
        return f"{self.channels}, r={self.r}, impl={self.impl!r}"


ACON_MODULES = (Swish, AconB, AconC, MetaAconC)
