"""``fuse_bn_acon(model)``: every BatchNorm → ACON-C / Meta-ACON pair runs as one fused op.

The fused op (``acon.fused.bn_act``) saves the BatchNorm input and recomputes the normalised value in
backward, so the BatchNorm output is never held for backward (the activation memory of conv → BN → ReLU).

A pair is a BatchNorm whose output goes only to the activation, which reads nothing else; the model's
``torch.fx`` graph finds them in any traceable model (the suite's families, converted timm and torchvision
models); an untraceable one falls back to consecutive ``nn.Sequential`` children and the ``(bn, act)``
attribute names a block lists in ``bn_act_pairs`` (see ``acon.fuse_pairs``). timm's ``BatchNormAct2d``
(BatchNorm and activation in one module) fuses with its converted ``act`` (``acon.fuse_norm_act``).

The swap changes no module tree: the BatchNorm stays where it is (its forward becomes the identity) and
the activation becomes a subclass that applies the BatchNorm itself. Parameters, buffers, state-dict keys,
parameter order (optimiser, DDP) and ``isinstance`` checks stay as they were, so the same checkpoints load
and save. ``unfuse_bn_acon`` undoes it (TorchScript needs that first). Under ``torch.compile`` tracing, or
on a device or dtype the fused op does not serve, a fused pair runs its two modules unfused.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from acon import fuse_norm_act as norm_act
from acon.activations import AconC, BatchNorm2dB1, MetaAconC
from acon.activations import _acon_c as acon_c_module_form
from acon.fuse_pairs import find_pairs
from acon.fused.bn_act import BNState, bn_acon_c, bn_meta_acon_c
from acon.syncbn import GlooSyncBatchNorm, GlooSyncBatchNormB1, SyncBatchNormB1

_PLAIN_BN = (nn.BatchNorm2d, nn.SyncBatchNorm, GlooSyncBatchNorm)
_B1 = (BatchNorm2dB1, GlooSyncBatchNormB1, SyncBatchNormB1)
_FROZEN_NAMES = ("FrozenBatchNorm2d",)
_BN_ATTR = "_fused_bn"


def _is_frozen(bn: nn.Module) -> bool:
    return type(bn).__name__ in _FROZEN_NAMES and all(
        hasattr(bn, a) for a in ("weight", "bias", "running_mean", "running_var", "eps")
    )


def _fusable_bn(m: nn.Module) -> bool:
    """BatchNorms whose forward is exactly batch norm (torch's, the synced ones, Meta-ACON's B1, frozen)."""
    return type(m) in _PLAIN_BN + _B1 or _is_frozen(m)


def _fusable_act(m: nn.Module) -> bool:
    return type(m) in (AconC, MetaAconC) and m.impl != "reference"


def _synced(bn: nn.Module) -> object | None:
    """The process group whose statistics a training-mode synced BatchNorm uses, else None."""
    if not isinstance(bn, nn.SyncBatchNorm | GlooSyncBatchNorm) or not bn.training:
        return None
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    group = getattr(bn, "process_group", None)
    return group if group is not None else dist.group.WORLD


def bn_state(bn: nn.Module, x: torch.Tensor) -> BNState:
    """What ``bn(x)`` would do now, as :class:`BNState`; counts the batch in ``num_batches_tracked`` where
    ``bn`` would (the momentum=None cumulative average reads the new count)."""
    if _is_frozen(bn):
        return BNState(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, 0.0, False, False)
    group = _synced(bn)
    one_value = x.numel() // x.shape[1] <= 1
    if isinstance(bn, _B1) and bn.training and bn.track_running_stats and one_value and group is None:
        return BNState(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, 0.0, False, False)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if batch_stats and group is None:
        torch.nn.functional._verify_batch_size(x.size())
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    rm, rv = (
        (bn.running_mean, bn.running_var) if (not bn.training or bn.track_running_stats) else (None, None)
    )
    return BNState(bn.weight, bn.bias, rm, rv, bn.eps, momentum, batch_stats, update, group)


def _serves(x: torch.Tensor) -> bool:
    return (
        x.device.type in ("cpu", "cuda")
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        and x.dim() >= 2
        and not torch.compiler.is_compiling()
    )


def _bn_forward(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The BatchNorm's own (unfused) forward, normalisation only."""
    return norm_act.norm_forward(bn)(bn, x)


def bn_output(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``bn(x)`` returns, without touching its running statistics (statistics hooks, β plots)."""
    if _is_frozen(bn):
        return _bn_forward(bn, x)
    batch = bn.training or bn.running_mean is None
    rm, rv = (None, None) if batch else (bn.running_mean, bn.running_var)
    return F.batch_norm(x, rm, rv, bn.weight, bn.bias, batch, 0.0, bn.eps)


class FusedBNAconC(AconC):
    """:class:`AconC` that applies the BatchNorm before it as well (see :func:`fuse_bn_acon`); its input is
    the BatchNorm's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__[_BN_ATTR]
        if not _serves(x):
            return AconC.forward(self, _bn_forward(bn, x))
        return bn_acon_c(x, bn_state(bn, x), self.p1, self.p2, self.beta)


class FusedBNMetaAconC(MetaAconC):
    """:class:`MetaAconC` that applies the BatchNorm before it as well (see :func:`fuse_bn_acon`); its
    input, and that of :meth:`generate_beta` (forward hooks, β statistics), is the BatchNorm's input."""

    def generate_beta(self, x: torch.Tensor) -> torch.Tensor:
        """β for the BatchNorm input ``x`` (normalised first, running statistics untouched)."""
        return MetaAconC.generate_beta(self, bn_output(self.__dict__[_BN_ATTR], x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__[_BN_ATTR]
        if not _serves(x):
            z = _bn_forward(bn, x)
            return acon_c_module_form(z, self.p1, self.p2, MetaAconC.generate_beta(self, z), self.impl)
        return bn_meta_acon_c(x, bn_state(bn, x), self)


_FUSED = {AconC: FusedBNAconC, MetaAconC: FusedBNMetaAconC}
_BASE = {v: k for k, v in _FUSED.items()}


def _passthrough(x: torch.Tensor) -> torch.Tensor:
    """A fused BatchNorm's forward: the activation after it normalises."""
    return x


def _is_acon(m: nn.Module) -> bool:
    return isinstance(m, AconC | MetaAconC)


def _fuse(model: nn.Module) -> str:
    """Fuse ``model``'s pairs in place; returns how they were found (for the log line)."""
    found = find_pairs(model, _fusable_bn, _is_acon)
    for bn, act in found.pairs:
        if _fusable_bn(bn) and _fusable_act(act) and "forward" not in bn.__dict__:
            object.__setattr__(bn, "forward", _passthrough)
            _fuse_act(bn, act)
    inner = norm_act.norm_act_pairs(model, _fusable_act)
    for bn, act in inner:
        norm_act.swap(bn)
        _fuse_act(bn, act)
    return found.how + (f"; {len(inner)} inside timm BatchNormAct2d modules" if inner else "")


def _fuse_act(bn: nn.Module, act: nn.Module) -> None:
    act.__dict__[_BN_ATTR] = bn
    act.__class__ = _FUSED[type(act)]


def fuse_bn_acon(model: nn.Module) -> nn.Module:
    """Fuse every BatchNorm → ACON-C / Meta-ACON pair of ``model`` in place; returns ``model``.

    State-dict keys, parameters and the module tree are unchanged (see the module docstring). Apply it
    after anything that replaces BatchNorm modules (``convert_sync_batchnorm``, freezing them): a pair
    keeps the BatchNorm object it was fused with."""
    _fuse(model)
    return model


def count_fused(model: nn.Module) -> int:
    """How many BatchNorm → ACON pairs of ``model`` run fused."""
    return sum(type(m) in _BASE for m in model.modules())


def unfuse_bn_acon(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_bn_acon` in place (e.g. before TorchScript export); returns ``model``."""
    for m in model.modules():
        if type(m) in _BASE:
            bn = m.__dict__.pop(_BN_ATTR)
            bn.__dict__.pop("forward", None)
            norm_act.restore(bn)
            m.__class__ = _BASE[type(m)]
    return model


def fuse_setting(setting: object, device: torch.device, compiled: bool) -> bool:
    """Whether ``trainer.fuse_bn_act`` (``true`` | ``false`` | ``auto``) fuses: ``auto`` fuses eager CPU
    runs, where it is measured to hold no more activation memory than ReLU at about the unfused step time
    (benchmarks/cpu_2026-12-06_bn_act.md); not compiled
    ones (traced code runs the pairs unfused) nor CUDA ones (not measured yet)."""
    if setting == "auto":
        return device.type == "cpu" and not compiled
    return bool(setting)


def fuse_for_run(model: nn.Module, setting: object, device: torch.device, compiled: bool) -> str | None:
    """Apply ``trainer.fuse_bn_act`` to ``model`` in place; returns the line to log (None: nothing to say,
    i.e. fusion off, or ``auto`` on a model without such pairs)."""
    if not fuse_setting(setting, device, compiled):
        return None
    how = _fuse(model)
    n = count_fused(model)
    if n == 0 and setting == "auto":
        return None
    return f"trainer.fuse_bn_act={setting}: {n} BatchNorm → ACON-C/Meta-ACON pairs run fused ({how})"


__all__ = [
    "FusedBNAconC",
    "FusedBNMetaAconC",
    "bn_output",
    "bn_state",
    "count_fused",
    "fuse_bn_acon",
    "fuse_for_run",
    "unfuse_bn_acon",
]
