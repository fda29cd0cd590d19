"""Optimiser, per-iteration LR schedule, EMA and mixup from the ``recipe`` config group."""

from __future__ import annotations

import contextlib
import logging

import torch
from omegaconf import DictConfig
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn

from acon.params import param_groups

SCHEDULES = ("linear", "cosine", "poly", "step", "triangular")
log = logging.getLogger(__name__)


def scaled_lr(recipe: DictConfig) -> float:
    """The linear-scaling rule: lr × batch_size / base_batch_size."""
    return float(recipe.lr) * float(recipe.batch_size) / float(recipe.base_batch_size)


def build_optimizer(model: nn.Module, recipe: DictConfig) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on conv/linear weights only (none on BN, biases, p1, p2, β)."""
    groups = param_groups(model, float(recipe.weight_decay))
    return torch.optim.SGD(
        groups, lr=scaled_lr(recipe), momentum=float(recipe.momentum), nesterov=bool(recipe.nesterov)
    )


def total_steps(recipe: DictConfig, batches_per_epoch: int) -> int:
    """Optimiser steps of the run: ``recipe.iterations`` (counted at base_batch_size), else epochs.

    Iterations scale with base_batch_size / batch_size, as the lr does, so another batch size keeps the
    recipe's number of epochs.
    """
    if recipe.iterations:
        scale = float(recipe.base_batch_size) / float(recipe.batch_size)
        return max(1, round(int(recipe.iterations) * scale))
    return int(recipe.epochs) * batches_per_epoch


class _DropTimmNoEffectWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "will have no effect" not in record.getMessage()


@contextlib.contextmanager
def _quiet_single_step_warning():
    """timm warns that a 1-step schedule 'will have no effect'; for a 1-step run that is expected."""
    loggers = [logging.getLogger(f"timm.scheduler.{m}") for m in ("poly_lr", "cosine_lr")]
    quiet = _DropTimmNoEffectWarning()
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)


def warmup_steps(recipe: DictConfig, total_steps: int) -> int:
    """Warm-up length in steps: ``recipe.warmup_epochs`` of the run's epochs when set, else ``warmup_steps``."""
    epochs = recipe.get("warmup_epochs")
    if not epochs:
        return int(recipe.warmup_steps)
    if not recipe.epochs:
        from acon.errors import ConfigError

        raise ConfigError(
            f"recipe.warmup_epochs={epochs} needs recipe.epochs (the run is {recipe.iterations} iterations): "
            "set recipe.warmup_steps instead"
        )
    return max(1, round(float(epochs) * total_steps / int(recipe.epochs)))


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: DictConfig, total_steps: int) -> Scheduler:
    """A timm scheduler stepped per iteration: linear decay to min_lr, cosine, poly (DeepLab's
    (1 - t/T)^power), step (Detectron's: × ``lr_gamma`` at each of ``lr_steps``), with optional warm-up, or
    triangular (FFCV's: linear warm-up to the peak, then linear decay from the peak to min_lr at the end).

    The trainer sets step k's lr (k = 1..total_steps) *before* the optimiser step, as the authors'
    train.py does (LambdaLR stepped before each update): linear gives step 1 lr·(1 - 1/T), the last 0.
    """
    warm = warmup_steps(recipe, total_steps)
    common = dict(
        t_initial=total_steps,
        lr_min=float(recipe.min_lr),
        warmup_t=warm,
        warmup_lr_init=float(recipe.warmup_lr),
        t_in_epochs=False,
    )
    with _quiet_single_step_warning():
        if recipe.schedule == "linear":
            return PolyLRScheduler(optimizer, power=1.0, **common)
        if recipe.schedule == "cosine":
            return CosineLRScheduler(optimizer, **common)
        if recipe.schedule == "poly":
            return PolyLRScheduler(optimizer, power=float(recipe.get("poly_power") or 0.9), **common)
        if recipe.schedule == "step":
            return step_scheduler(optimizer, recipe, common)
        if recipe.schedule == "triangular":  # FFCV's: the peak at the warm-up's end, then down to min_lr
            common.update(t_initial=max(1, total_steps - warm), warmup_prefix=True)
            return PolyLRScheduler(optimizer, power=1.0, **common)
    raise ValueError(f"recipe.schedule={recipe.schedule!r} is not one of {SCHEDULES}")


def step_scheduler_steps(recipe: DictConfig) -> list[int]:
    """``recipe.lr_steps`` in steps of the run's batch size (they count at base_batch_size)."""
    scale = float(recipe.base_batch_size) / float(recipe.batch_size)
    return [max(1, round(int(s) * scale)) for s in (recipe.get("lr_steps") or [])]


def step_scheduler(optimizer: torch.optim.Optimizer, recipe: DictConfig, common: dict) -> Scheduler:
    """lr × ``lr_gamma`` from each step (1-based) of ``recipe.lr_steps`` on; they count at base_batch_size,
    as ``recipe.iterations`` does, so another batch size moves them with the run's length."""
    from timm.scheduler import MultiStepLRScheduler

    # timm applies milestone m from t = m - 1 on, and the trainer asks for step k's lr with t = k: m + 1
    # makes step k (1-based) run at the decayed lr exactly from k = lr_steps on, warm-up not shifting it
    decay_t = [s + 1 for s in step_scheduler_steps(recipe)]
    common = {k: v for k, v in common.items() if k not in ("t_initial", "lr_min")}
    return MultiStepLRScheduler(
        optimizer, decay_t=decay_t, decay_rate=float(recipe.lr_gamma), warmup_prefix=False, **common
    )


def step_lrs(recipe: DictConfig, total_steps: int, steps: list[int]) -> list[float]:
    """The lr that the optimiser steps numbered ``steps`` (1-based) use under this recipe."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=scaled_lr(recipe))
    scheduler = build_scheduler(probe, recipe, total_steps)
    lrs = []
    for k in steps:
        scheduler.step_update(k)
        lrs.append(probe.param_groups[0]["lr"])
    return lrs


def schedule_warnings(recipe: DictConfig, total_steps: int) -> list[str]:
    """Schedules that cannot do what the recipe means: a warm-up that never ends, or one that starts above
    the lr it warms up to (``warmup_lr`` is absolute; the lr scales with the batch)."""
    warm, lr, warmup_lr = warmup_steps(recipe, total_steps), scaled_lr(recipe), float(recipe.warmup_lr)
    warnings = []
    if warm and warm >= total_steps:
        warnings.append(
            f"recipe.warmup_steps={warm} is not shorter than the run ({total_steps} steps): the lr rises "
            f"to the last step and never decays; lower recipe.warmup_steps (e.g. to "
            f"{max(1, total_steps // 5)}) or train longer"
        )
    if warm and warmup_lr > lr:
        same_ratio = warmup_lr * lr / float(recipe.lr)
        warnings.append(
            f"recipe.warmup_lr={warmup_lr:g} is above the run's lr {lr:g} ({recipe.lr} × "
            f"{recipe.batch_size}/{recipe.base_batch_size}): the warm-up lowers the lr instead of raising it; "
            f"set recipe.warmup_lr={same_ratio:.3g} (the recipe's ratio to its lr) or lower"
        )
    return warnings


def describe_schedule(recipe: DictConfig, total_steps: int, batches_per_epoch: int) -> str:
    """One line for the start banner: length in steps and epochs, batch, warm-up and lr at the ends."""
    batch = int(recipe.batch_size)
    epochs = total_steps / max(batches_per_epoch, 1)
    text = f"schedule: {recipe.schedule}, {total_steps} steps = {epochs:.1f} epochs at global batch {batch}"
    if recipe.iterations:
        text += f" ({recipe.iterations} iterations at base batch {recipe.base_batch_size})"
    text += f", lr {scaled_lr(recipe):g} ({recipe.lr} × {batch}/{recipe.base_batch_size})"
    warm = warmup_steps(recipe, total_steps)
    if warm:
        text += f", warm-up {warm} steps from lr {float(recipe.warmup_lr):g} to {scaled_lr(recipe):g}"
    first, last = step_lrs(recipe, total_steps, [1, total_steps])
    if recipe.schedule == "step":
        decay = f"× {float(recipe.lr_gamma):g} at steps {list(step_scheduler_steps(recipe))}"
    else:
        decay = f"{recipe.schedule} decay to {float(recipe.min_lr):g}"
    return f"{text}, {decay}; step 1 at lr {first:.4g}, step {total_steps} at {last:.4g}"


def log_schedule(recipe: DictConfig, total_steps: int, batches_per_epoch: int) -> str:
    """Log the schedule line (and any warning about it) through python logging; returns the line."""
    line = describe_schedule(recipe, total_steps, batches_per_epoch)
    log.info(line)
    for warning in schedule_warnings(recipe, total_steps):
        log.warning(warning)
    return line


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
