"""The lines a person reads: start banner, one line per epoch, closing summary, eval rows.

Everything goes through the ``acon`` logger, so Hydra's job logging (``configs/hydra/job_logging``)
prints it and writes the same lines to the run's ``train.log``. Callers log on rank 0 only.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger("acon")


def show_progress_bar(wanted: bool) -> bool:
    """A redrawing bar only for a person at a terminal: stderr is a TTY and the job is not under SLURM."""
    return wanted and sys.stderr.isatty() and "SLURM_JOB_ID" not in os.environ


def to_log_files(message: str, level: int = logging.WARNING) -> None:
    """Write ``message`` to the log files only (the run's train.log), for a line already on the console."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in {*logging.getLogger().handlers, *log.handlers}:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def epochs_done(epoch: int, batch_in_epoch: int, batches_per_epoch: int) -> int | float:
    """The run's position in epochs, the one numbering of every line, record and summary: ``1`` after the
    first epoch, ``0.3636`` 36 % into it (fractions rounded to 4 digits)."""
    if not batch_in_epoch:
        return epoch
    return round(epoch + batch_in_epoch / max(batches_per_epoch, 1), 4)


def epoch_text(epochs: int | float) -> str:
    """An epoch position in words: ``3`` or ``0.36``."""
    return str(int(epochs)) if float(epochs).is_integer() else f"{epochs:.2f}"


def hms(seconds: float) -> str:
    """``h:mm:ss``."""
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def rate_text(per_s: float) -> str:
    """A rate for a log line: whole numbers from 10 up, two significant digits below (``0.13``, not ``0``)."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2g}"


def activation_impl(model, device) -> str:
    """Which ACON-C implementation the model's activations run on ``device`` (empty for other ones)."""
    import torch

    from acon.activations import AconC, MetaAconC

    layer = next((m for m in model.modules() if isinstance(m, AconC | MetaAconC)), None)
    if layer is None:
        return ""
    if layer.impl == "reference":
        return "reference form"
    from acon import fused

    probe = torch.empty(2, layer.channels, 8, 8, device="meta" if device.type != "cpu" else "cpu")
    if device.type == "cuda":
        return "fused (Triton)" if fused.ops.triton_importable() else "reference form"
    if not fused.available(probe, layer.impl):
        return "reference form"
    mode = fused.cpu.mode()
    return {"native": "fused (C++ kernels)", "compiled": "fused (Inductor)"}.get(mode, f"fused ({mode})")


def dataset_size(loader) -> int | None:
    """Samples in a (possibly wrapped) loader's dataset, when it has a length."""
    inner = getattr(loader, "loader", loader)
    try:
        return len(inner.dataset)
    except TypeError:
        return None


@dataclass
class RunFacts:
    """What the banner says about a run."""

    model: str
    activation: str
    params: int
    macs: int
    img_size: int | tuple[int, int]  # the input the MACs are counted at: a square side or (H, W)
    train_size: int | None
    val_size: int | None
    world_size: int
    device: str
    precision: str
    global_batch: int
    total_steps: int
    run_dir: Path
    resumed_step: int | None = None
    resumed_from: Path | None = None
    extra: dict = field(default_factory=dict)
    cpu: str | None = None  # CPU threads and loader workers, and why (acon.cpu_budget.CpuPlan.line)


def run_facts(
    cfg: DictConfig,
    model,
    info,
    train_loader,
    val_loader,
    total_steps: int,
    run_dir: Path,
    flops_size: int | tuple[int, int],
) -> RunFacts:
    """The banner's facts for a trainer's objects; MACs are counted at ``flops_size`` (the task's
    ``flops_input``: the size the reported metric is measured at)."""
    import models
    from acon import cpu_budget

    impl = activation_impl(model, info.device)
    plan = cpu_budget.applied()
    act = cfg.activation.name + (f" [{impl}]" if impl else "")
    return RunFacts(
        model=f"{cfg.model.name} ({cfg.model.arch})",
        activation=act,
        params=models.count_params(model),
        macs=models.count_flops(model, flops_size),
        img_size=flops_size,
        train_size=dataset_size(train_loader),
        val_size=dataset_size(val_loader),
        world_size=info.world_size,
        device=str(info.device),
        precision=str(cfg.trainer.precision),
        global_batch=int(cfg.recipe.batch_size),
        total_steps=total_steps,
        run_dir=run_dir,
        cpu=plan.line() if plan is not None else None,
    )


def macs_text(macs: float) -> str:
    """``299.4 M``; ``155.1 G`` from 10 G up (a full-size segmentation input)."""
    return f"{macs / 1e9:.1f} G" if macs >= 1e10 else f"{macs / 1e6:.1f} M"


def size_text(size: int | tuple[int, int]) -> str:
    """An image size in words: ``224`` for a square side, ``1024x2048`` for (H, W)."""
    return str(size) if isinstance(size, int) else "x".join(str(int(v)) for v in size)


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def banner_lines(facts: RunFacts, schedule: str | None = None) -> list[str]:
    """The start banner; ``schedule`` (the recipe's schedule in words) gets its own line when given."""
    lines = [
        f"acon: model {facts.model}, activation {facts.activation}",
        f"  {facts.params / 1e6:.2f} M params, {macs_text(facts.macs)} MACs at {size_text(facts.img_size)} px",
        f"  data: {_count(facts.train_size)} train / {_count(facts.val_size)} val images",
        f"  {facts.world_size} process(es) on {facts.device}, {facts.precision}, global batch "
        f"{facts.global_batch}, {facts.total_steps:,} steps",
    ]
    if facts.cpu:
        lines.append(f"  {facts.cpu}")
    if schedule:
        lines.append(f"  schedule: {schedule}")
    lines.append(f"  run dir: {facts.run_dir}")
    if facts.resumed_step is not None:
        lines.append(f"  resumed from step {facts.resumed_step} ({facts.resumed_from})")
    return lines


def log_banner(facts: RunFacts, schedule: str | None = None) -> None:
    """Log the start banner."""
    for line in banner_lines(facts, schedule):
        log.info(line)


class RunClock:
    """Elapsed time and ETA from the steps this process has run."""

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.t0, self.start_step, self.total_steps = time.perf_counter(), start_step, total_steps

    def elapsed(self) -> float:
        """Seconds since this process started training."""
        return time.perf_counter() - self.t0

    def eta(self, step: int) -> float:
        """Seconds left at the pace of this process so far."""
        done = step - self.start_step
        return self.elapsed() / done * (self.total_steps - step) if done > 0 else math.nan


def _val_text(record: dict, task=None) -> str:
    if task is not None:
        if f"val_{task.primary_metric}" not in record:
            return "val -"
        return "val " + task.metrics_text({k[4:]: v for k, v in record.items() if k.startswith("val_")})
    if "val_top1_err" not in record:
        return "val -"
    top5 = f" top-5 err {record['val_top5_err']:.2f}%" if "val_top5_err" in record else ""
    return f"val top-1 err {record['val_top1_err']:.2f}%{top5}"


def epoch_line(
    record: dict, total_epochs: int, best: dict | None, clock: RunClock, images_per_s: float, task=None
) -> str:
    """``epoch i/N``, step, train loss, the validation metrics (``task.metrics_text``; default top-1/top-5
    error), the best primary metric so far (%), lr, images/s, elapsed, ETA."""
    eta = clock.eta(record["step"])
    metric = "top1_err" if task is None else task.primary_metric
    best_txt = f"best {best[metric]:.2f}% (epoch {epoch_text(best['epoch'])})" if best else "best -"
    return (
        f"epoch {epoch_text(record['epoch'])}/{total_epochs}  step {record['step']}/{clock.total_steps}  "
        f"train loss {record['train_loss']:.4f}  {_val_text(record, task)}  {best_txt}  lr {record['lr']:.4g}  "
        f"{rate_text(images_per_s)} img/s  elapsed {hms(clock.elapsed())}  "
        f"ETA {hms(eta) if not math.isnan(eta) else '-'}"
    )


def summary_lines(results: dict, run_dir: Path) -> list[str]:
    """The closing summary: final and best error, wall time, and where everything went."""
    run_dir = Path(run_dir)
    status = results.get("status", "complete")
    metric = results.get("primary_metric", "top1_err")
    if metric == "top1_err":
        top5 = f" (top-5 {results['top5_err']:.2f}%)" if "top5_err" in results else ""
        what = f"final top-1 error {results['top1_err']:.2f}%{top5}"
    else:
        what = f"final {metric} {results[metric]:.2f}%"
    best = results.get("best_checkpoint", str(run_dir / "best.pt"))
    return [
        f"{'done' if status == 'complete' else status}: {what}, best "
        f"{results[f'best_{metric}']:.2f}% at epoch {epoch_text(results['best_epoch'])}, "
        f"wall time {hms(results['wall_time_s'])}",
        f"  run dir:     {run_dir}",
        f"  results:     {run_dir / 'results.json'}",
        f"  best:        {best or 'none written (no validation at an epoch end before the stop)'}",
        f"  TensorBoard: tensorboard --logdir {run_dir / 'tb'}",
    ]


def log_summary(results: dict, run_dir: Path) -> None:
    """Log the closing summary."""
    for line in summary_lines(results, run_dir):
        log.info(line)


def eval_line(row: dict) -> str:
    """One checkpoint's evaluation."""
    skipped = row.get("bad_images_skipped", 0)
    return (
        f"{row['checkpoint']}: top-1 error {row['top1_err']:.2f}%"
        + (f"  top-5 error {row['top5_err']:.2f}%" if "top5_err" in row else "")
        + "  "
        f"({row['count']} images{f', {skipped} bad skipped' if skipped else ''})"
    )
