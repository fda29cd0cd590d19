"""Optimiser, per-iteration LR schedule, EMA and mixup from the ``recipe`` config group."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn

from acon.params import param_groups

SCHEDULES = ("linear", "cosine")


def scaled_lr(recipe: DictConfig) -> float:
    """The linear-scaling rule: lr × batch_size / base_batch_size."""
    return float(recipe.lr) * float(recipe.batch_size) / float(recipe.base_batch_size)


def build_optimizer(model: nn.Module, recipe: DictConfig) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on conv/linear weights only (none on BN, biases, p1, p2, β)."""
    groups = param_groups(model, float(recipe.weight_decay))
    return torch.optim.SGD(
        groups, lr=scaled_lr(recipe), momentum=float(recipe.momentum), nesterov=bool(recipe.nesterov)
    )


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: DictConfig, total_steps: int) -> Scheduler:
    """A timm scheduler stepped per iteration: linear decay to min_lr, or cosine, with optional warm-up."""
    common = dict(
        t_initial=total_steps,
        lr_min=float(recipe.min_lr),
        warmup_t=int(recipe.warmup_steps),
        warmup_lr_init=float(recipe.warmup_lr),
        t_in_epochs=False,
    )
    if recipe.schedule == "linear":
        return PolyLRScheduler(optimizer, power=1.0, **common)
    if recipe.schedule == "cosine":
        return CosineLRScheduler(optimizer, **common)
    raise ValueError(f"recipe.schedule={recipe.schedule!r} is not one of {SCHEDULES}")


def build_ema(model: nn.Module, recipe: DictConfig) -> ModelEmaV3 | None:
    """timm's ModelEmaV3 when recipe.ema_decay is set."""
    if not recipe.ema_decay:
        return None
    return ModelEmaV3(model, decay=float(recipe.ema_decay))


def build_mixup(recipe: DictConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix (with label smoothing folded in) when either alpha is > 0."""
    if not (recipe.mixup or recipe.cutmix):
        return None
    return Mixup(
        mixup_alpha=float(recipe.mixup),
        cutmix_alpha=float(recipe.cutmix),
        label_smoothing=float(recipe.label_smoothing),
        num_classes=num_classes,
    )


def build_criterion(recipe: DictConfig, mixup: Mixup | None) -> nn.Module:
    """Soft-target CE under mixup, else cross-entropy with the recipe's label smoothing."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=float(recipe.label_smoothing))
