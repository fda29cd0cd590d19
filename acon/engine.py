"""One training step and a full evaluation pass: the numeric core, free of I/O and bookkeeping."""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
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


TOP5_MIN_CLASSES = 6
"""Fewer classes than this: top-5 error is 0 by construction and is not reported."""


class HostFlags:
    """Sums host-side numbers across ranks (stop requests, stalled loaders, bad images) before a step.

    Every rank calls :meth:`sum` once per step, after its wait for a batch and before the forward pass,
    so a rank that stops (signal, stalled loader) is never left alone in a gradient collective. The sum
    runs on a CPU (gloo) group: no device synchronisation. Without DDP it is the identity.
    """

    def __init__(self, timeout_s: float = 600.0) -> None:
        self.on = dist.is_initialized() and dist.get_world_size() > 1
        self.group = None
        if self.on and dist.get_backend() != "gloo":  # a collective: every rank builds it in fit
            # trainer.dist_timeout_s, as the default group (gloo's own default would hold ranks 30 min)
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over ranks."""
        if not self.on:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()


class StepGuard:
    """Device-side bookkeeping of the steps between two reads, so a step never waits for the device.

    Each step adds its loss to a device sum and a flag for a non-finite loss (the same on every rank: the
    flags are all-reduced on the device, which does not block the host). :meth:`read` fetches all of it
    in one transfer at the points that synchronise anyway (logging intervals, saves, validation): the
    first bad step is named exactly, and it is read before anything is saved or validated.

    Under ``skip`` (:meth:`masked`) a bad step is undone on the device: every parameter, model buffer
    (BatchNorm's running statistics, moved by the forward), optimiser state, EMA and GradScaler tensor is
    put back with ``torch.where`` on the step's flag; state the step created is reset to what a fresh one
    starts from (a zero momentum buffer, the GradScaler's initial scale).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._zeros()

    def _zeros(self) -> None:
        z = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_sum, self.loss_count, self.bad_count = z.clone(), z.clone(), z.clone()
        self.first_bad = torch.full((), -1.0, dtype=torch.float64, device=self.device)

    def observe(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Account one step's loss; returns its 0-d bool flag (True: non-finite on some rank)."""
        loss = loss.detach().double()
        bad = ~torch.isfinite(loss)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = bad.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag.bool()
        self.first_bad = torch.where(bad & (self.first_bad < 0), float(step), self.first_bad)
        self.bad_count += bad
        self.loss_sum += torch.where(bad, 0.0, loss)
        self.loss_count += ~bad
        return bad

    def read(self) -> tuple[int | None, int, float, int]:
        """(first bad step or None, bad steps, loss sum, good steps) since the last read; one transfer."""
        first, bad, total, count = torch.stack(
            [self.first_bad, self.bad_count, self.loss_sum, self.loss_count]
        ).tolist()
        self._zeros()
        return (None if first < 0 else int(first)), int(bad), total, int(count)

    @staticmethod
    def masked(ctx: StepContext, step) -> torch.Tensor:
        """Run ``step()`` (forward, :meth:`observe`, update), which returns the step's flag; then restore every
        state tensor it changed where the flag is set: the model's buffers too, which the forward moves
        (BatchNorm's running statistics would keep a NaN forward's values)."""
        before = {id(t): (t, t.detach().clone()) for t in _state_tensors(ctx)}
        bad = step()
        with torch.no_grad():
            for t in _state_tensors(ctx):
                if id(t) in before and before[id(t)][0] is t:
                    t.copy_(torch.where(bad, before[id(t)][1], t))
                else:  # created by this step: what a fresh one starts from
                    t.masked_fill_(bad, _fresh_value(ctx, t))
        return bad


def _state_tensors(ctx: StepContext) -> list[torch.Tensor]:
    """The tensors an optimisation step updates: parameters, the model's buffers, optimiser state, EMA,
    GradScaler state."""
    out = [p for g in ctx.optimizer.param_groups for p in g["params"]]
    out += list((ctx.raw_model or ctx.model).buffers())
    for state in ctx.optimizer.state.values():
        out += [v for v in state.values() if torch.is_tensor(v)]
    if ctx.ema is not None:
        module = getattr(ctx.ema, "module", ctx.ema)
        out += [t for t in module.state_dict(keep_vars=True).values() if t.is_floating_point()]
    for name in ("_scale", "_growth_tracker"):
        t = getattr(ctx.scaler, name, None)
        if torch.is_tensor(t):
            out.append(t)
    return out


def _fresh_value(ctx: StepContext, t: torch.Tensor) -> float:
    """The value a state tensor created by a skipped step is reset to: the GradScaler's initial scale for
    its scale (created at the first step of a process, resumed runs included; 0 would zero every later
    gradient), 0 for the rest (a zero momentum buffer acts as a fresh one, a growth tracker starts at 0)."""
    if t is getattr(ctx.scaler, "_scale", None):
        return float(ctx.scaler._init_scale)
    return 0.0


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, precision: str = "fp32", channels_last: bool = False
) -> dict:
    """Top-1/top-5 error and loss over every sample of ``loader`` on every rank (summed across ranks).

    With ``TOP5_MIN_CLASSES - 1`` classes or fewer every label is among the top 5: no ``top5_err`` then."""
    was_training = model.training
    model.eval()
    ctx = StepContext(model, None, None, None, None, device, precision, channels_last)
    correct1 = correct5 = loss_sum = count = skipped = 0.0
    classes = 0
    bad_files: list[str] = []
    for images, targets, n_bad in loader:
        skipped += n_bad
        bad_files.extend(getattr(n_bad, "files", ()))
        if images is None:  # every image of the batch was skipped
            continue
        images, targets = to_device(images, ctx), targets.to(device)
        with autocast(device, precision):
            logits = model(images).float()
        classes = logits.shape[1]
        k = min(5, classes)
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
    top5 = {"top5_err": 100.0 * (1 - correct5 / count)} if classes >= TOP5_MIN_CLASSES else {}
    return {
        "top1_err": 100.0 * (1 - correct1 / count),
        **top5,
        "loss": loss_sum / count,
        "count": int(count),
        "bad_images_skipped": int(skipped),
        "bad_image_files": bad_files,  # this rank's
    }
