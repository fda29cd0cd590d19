"""One training step and a full evaluation pass: the numeric core, free of I/O and bookkeeping."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from acon.distributed import all_reduce_sum

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Autocast for bf16/fp16, a null context for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r} is not one of {tuple(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class StepContext:
    """Everything a training step touches."""

    model: nn.Module  # the (possibly DDP-wrapped, compiled) model that runs forward
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    clip_grad: float | None = None
    mixup: object | None = None
    ema: object | None = None
    raw_model: nn.Module | None = None  # the unwrapped model, for EMA updates
    extra: dict = field(default_factory=dict)


def to_device(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Move an image batch to the device in the configured memory format."""
    x = x.to(ctx.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if ctx.channels_last and x.dim() == 4 else x


def forward_loss(ctx: StepContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mixup (if on), forward under autocast and the loss, in fp32."""
    images, targets = to_device(images, ctx), targets.to(ctx.device, non_blocking=True)
    if ctx.mixup is not None:
        images, targets = ctx.mixup(images, targets)
    with autocast(ctx.device, ctx.precision):
        logits = ctx.model(images)
    return ctx.criterion(logits.float(), targets)


def optimizer_step(ctx: StepContext, loss: torch.Tensor, step: int) -> None:
    """The per-iteration LR, backward, optional clipping, the (scaled) optimiser step and the EMA.

    Step ``step`` (0-based) runs at the schedule's value for ``step + 1``, set before the update as the
    authors' train.py steps its scheduler: a linear schedule of T steps uses lr·(1 - 1/T) first, 0 last.
    """
    ctx.scheduler.step_update(step + 1)
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scaler.scale(loss).backward()
    if ctx.clip_grad:
        ctx.scaler.unscale_(ctx.optimizer)
        nn.utils.clip_grad_norm_(ctx.model.parameters(), float(ctx.clip_grad))
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    if ctx.ema is not None:
        ctx.ema.update(ctx.raw_model, step=step + 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, precision: str = "fp32", channels_last: bool = False
) -> dict:
    """Top-1/top-5 error and loss over every sample of ``loader`` on every rank (summed across ranks)."""
    was_training = model.training
    model.eval()
    ctx = StepContext(model, None, None, None, None, device, precision, channels_last)
    correct1 = correct5 = loss_sum = count = skipped = 0.0
    bad_files: list[str] = []
    for images, targets, n_bad in loader:
        skipped += n_bad
        bad_files.extend(getattr(n_bad, "files", ()))
        if images is None:  # every image of the batch was skipped
            continue
        images, targets = to_device(images, ctx), targets.to(device)
        with autocast(device, precision):
            logits = model(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(targets[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    correct1, correct5, loss_sum, count, skipped = all_reduce_sum(
        [correct1, correct5, loss_sum, count, skipped], device
    )
    if count == 0:
        raise RuntimeError("evaluation saw no samples")
    return {
        "top1_err": 100.0 * (1 - correct1 / count),
        "top5_err": 100.0 * (1 - correct5 / count),
        "loss": loss_sum / count,
        "count": int(count),
        "bad_images_skipped": int(skipped),
        "bad_image_files": bad_files,  # this rank's
    }
