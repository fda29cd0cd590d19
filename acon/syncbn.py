"""SyncBatchNorm for CPU (gloo) as well as GPU: torch's SyncBatchNorm only runs on accelerators.

Meta-ACON's ``BatchNorm2dB1`` (its β-net sees one value per channel at batch size 1) becomes a synced
BatchNorm that keeps that behaviour: with nothing to sync with, a batch of one uses the running stats.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from acon.activations import BatchNorm2dB1


def global_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """A copy of ``t`` summed over every rank of ``group`` (the default group when None)."""
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def global_moments(x: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of (N, C, ...) ``x`` over every rank (float64 sums), and the
    global number of values per channel (a float64 scalar tensor)."""
    dims = [0] + list(range(2, x.dim()))
    xd = x.double()
    return combine_moments(xd.sum(dims), (xd * xd).sum(dims), x.numel() / x.shape[1], group)


def combine_moments(
    sum_x: torch.Tensor, sum_xx: torch.Tensor, count: float, group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every rank from this rank's float64 Σx, Σx² and count of
    values per channel (one all-reduce), and the global count (a float64 scalar tensor)."""
    total = global_sum(torch.cat([sum_x, sum_xx, sum_x.new_tensor([count])]), group)
    c = sum_x.numel()
    n = total[-1]
    mean = total[:c] / n
    return mean, (total[c : 2 * c] / n - mean * mean).clamp_min(0), n


def update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    unbiased_var: torch.Tensor,
    m: float,
) -> None:
    """Move BatchNorm's running statistics towards a batch's mean and unbiased variance by momentum ``m``."""
    with torch.no_grad():
        running_mean.mul_(1 - m).add_(mean.to(running_mean.dtype), alpha=m)
        running_var.mul_(1 - m).add_(unbiased_var.to(running_var.dtype), alpha=m)


def global_grad_means(sum_dy, sum_dy_xhat, count, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel Σdy/count and Σdy·x̂/count of a BatchNorm's backward over every rank of ``group``: the
    local sums are all-reduced in float64; ``count`` is the global number of values per channel."""
    c = sum_dy.shape[0]
    sums = global_sum(torch.cat([sum_dy, sum_dy_xhat]).double(), group)
    return sums[:c] / count, sums[c:] / count


def sync_bn_grads(dy, xhat, weight, invstd, count, group=None):
    """(dx, dw, db) of a BatchNorm whose batch statistics span ``group``: Σdy and Σdy·x̂ are all-reduced
    (float64) and divided by ``count``, the global number of values per channel; ``weight`` None is 1."""
    c, dims = xhat.shape[1], [0] + list(range(2, xhat.dim()))
    shape = (1, c) + (1,) * (xhat.dim() - 2)
    dw = (dy * xhat).sum(dims)
    db = dy.sum(dims)
    mean_g, mean_gx = global_grad_means(db, dw, count, group)
    w = torch.ones_like(db) if weight is None else weight.to(dy.dtype)
    mean_g = mean_g.to(dy.dtype) * w
    mean_gx = mean_gx.to(dy.dtype) * w
    dx = (dy * w.view(shape) - mean_g.view(shape) - xhat * mean_gx.view(shape)) * invstd.to(dy.dtype).view(
        shape
    )
    return dx, dw, db


class _SyncBNFunction(torch.autograd.Function):
    """Batch statistics and their gradients reduced over every rank (sums in float64)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        c = x.shape[1]
        mean, var, count = global_moments(x)
        invstd = torch.rsqrt(var + eps)
        shape = (1, c) + (1,) * (x.dim() - 2)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.to(x.dtype).view(shape)
        ctx.save_for_backward(xhat, weight, invstd.to(x.dtype))
        ctx.count = count
        return xhat * weight.view(shape) + bias.view(shape), mean, var * count / (count - 1).clamp_min(1)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        xhat, weight, invstd = ctx.saved_tensors
        return (*sync_bn_grads(dy, xhat, weight, invstd, ctx.count), None)


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span all ranks, on any device and backend (gloo included).

    Evaluation, or a single process, is plain batch norm. State-dict keys are those of BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        y, mean, unbiased_var = _SyncBNFunction.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            update_running(self.running_mean, self.running_var, mean, unbiased_var, m)
        return y


def _one_value_per_channel(bn: _BatchNorm, x: torch.Tensor) -> bool:
    """Training on one value per channel with nothing to sync with: Meta-ACON's β-net at batch size 1."""
    alone = not (dist.is_initialized() and dist.get_world_size() > 1)
    return bn.training and bn.track_running_stats and alone and x.numel() // x.shape[1] <= 1


def _running_stats(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm2dB1's batch-of-one forward: normalise with the running statistics, leave them as they are."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class GlooSyncBatchNormB1(GlooSyncBatchNorm):
    """:class:`GlooSyncBatchNorm` for ``BatchNorm2dB1``: a batch of one, alone, uses the running stats."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _running_stats(self, x) if _one_value_per_channel(self, x) else super().forward(x)


class SyncBatchNormB1(nn.SyncBatchNorm):
    """torch's SyncBatchNorm for ``BatchNorm2dB1``: a batch of one, alone, uses the running stats."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _running_stats(self, x) if _one_value_per_channel(self, x) else super().forward(x)


class GlooSyncBatchNormAct(GlooSyncBatchNorm):
    """:class:`GlooSyncBatchNorm` for timm's ``BatchNormAct2d``: its ``drop`` and ``act`` children after the
    normalisation, as timm's ``SyncBatchNormAct`` on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _sync_class(bn: _BatchNorm, device: torch.device) -> type[_BatchNorm]:
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import SyncBatchNormAct

    if isinstance(bn, BatchNorm2dB1):
        return SyncBatchNormB1 if device.type == "cuda" else GlooSyncBatchNormB1
    if isinstance(bn, BatchNormAct2d):
        return SyncBatchNormAct if device.type == "cuda" else GlooSyncBatchNormAct
    return nn.SyncBatchNorm if device.type == "cuda" else GlooSyncBatchNorm


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm made synced: torch's SyncBatchNorm on CUDA, :class:`GlooSyncBatchNorm` elsewhere
    (same keys, same stats); Meta-ACON's ``BatchNorm2dB1`` keeps its batch-of-one behaviour, and timm's
    ``BatchNormAct2d`` its dropout and activation (converted in turn: a Meta-ACON's own BatchNorms)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm | nn.SyncBatchNorm):
        new = _sync_class(module, device)(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        for name, child in module.named_children():  # BatchNormAct2d: drop, act
            new.add_module(name, convert_sync_batchnorm(child, device))
        ref = next(iter(module.state_dict().values()), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        new.load_state_dict(module.state_dict())
        for name, p in module.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(p.requires_grad)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module
