"""The ``Task`` protocol: what a task (classification, segmentation, detection) gives the shared trainer.

The trainer (``acon.trainer``), ``eval.py`` (``acon.evaluation``), results.json, metrics.jsonl, TensorBoard,
best.pt selection, the epoch line and ``scripts/make_table.py`` call these methods and never branch on a
task's name. A task is one small module under ``acon/tasks/``: its model, loss, evaluation and metrics.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from omegaconf import DictConfig
from torch import nn

from acon.errors import ConfigError


@runtime_checkable
class Task(Protocol):
    """One kind of training problem, behind the shared machinery.

    Loaders yield ``(inputs, targets, n_bad)``: ``inputs`` an NCHW tensor (or a list of CHW tensors for
    detection), ``targets`` a tensor (or a list of dicts), ``n_bad`` the skipped bad images of the batch
    (an int, or ``acon.data.bad_images.BadImages`` with the files). Under ``data.bad_image_policy=skip`` a
    batch whose every image was bad is ``(None, None, n_bad)``.

    A task is built once from the run's config (``acon.tasks.task_of(cfg)``) and keeps what it needs from
    it; ``get_task(name)`` without a config gives the names and the metrics' words only.
    """

    name: str  # "classification" | "segmentation" | "detection"
    primary_metric: str  # key of evaluate()'s dict used for best.pt and tables: "top1_err" | "mIoU" | "AP"
    higher_is_better: bool  # False for top1_err, True for mIoU / AP
    scalar_metrics: tuple[str, ...]  # evaluate() keys logged as TensorBoard val/<key>, kept in best, EMA'd
    # Metrics are in percent (top-1 error %, mIoU %, AP x 100): the epoch line prints "best <value>%".
    recipe_keys: Collection[str] | None  # recipe keys it honours (None: all); others must keep their default

    def check_config(self, cfg: DictConfig) -> None:
        """Task-specific config checks, before any data is read or model built (raise ConfigError)."""

    def identity(self, cfg: DictConfig) -> dict:
        """Entries added to the run identity a resumed run must share (empty: nothing beyond the model)."""

    def build_loaders(self, cfg: DictConfig, info) -> tuple[Any, Any, int]:
        """(train loader, val loader, training-set size); ``info`` is ``acon.distributed.DistInfo``."""

    def build_val_loader(self, cfg: DictConfig, batch_size: int, info, cache: dict) -> Any:
        """eval.py's loader over ``cfg.data``'s validation split only (``cache`` keeps datasets by key)."""

    def build_model(self, cfg: DictConfig, load_backbone: bool | None = None) -> nn.Module:
        """The whole network (backbone + head) from the ``model``, ``activation``, ``task`` and data groups.

        ``load_backbone=False``: full weights follow (eval.py, a resume), ``backbone.checkpoint`` is not
        read; None: read it unless the run resumes from a checkpoint."""

    def build_mixup(self, cfg: DictConfig) -> Any:
        """The batch mixing the trainer applies (timm's Mixup), or None."""

    def build_criterion(self, cfg: DictConfig, mixup: Any) -> nn.Module | None:
        """The training criterion the trainer's forward uses, or None when ``loss`` computes its own."""

    def flops_input(self, cfg: DictConfig) -> int | tuple[int, int]:
        """The image size (square side or (H, W)) whose forward pass results.json's FLOPs count."""

    def loss(self, ctx, inputs, targets) -> torch.Tensor:
        """Forward under autocast (``ctx``: ``acon.engine.StepContext``), the scalar fp32 training loss."""

    def evaluate(self, model: nn.Module, loader, cfg: DictConfig, info) -> dict:
        """Metrics over the whole val set across ranks; has ``primary_metric``, every ``scalar_metrics``
        key, ``count``, ``bad_images_skipped`` and ``bad_image_files`` (this rank's)."""

    def sample_input(self, inputs) -> torch.Tensor | None:
        """A small NCHW batch of ``inputs`` for β statistics, or None."""

    def metrics_text(self, metrics: dict) -> str:
        """The metrics in words for the epoch line and eval.py, e.g. ``top-1 err 2.79% top-5 err 0.00%``."""

    def result_fields(self, final: dict, best: dict | None) -> dict:
        """The task's entries of results.json from the final validation (unprefixed keys) and the best."""


LABEL_RECIPE_KEYS = ("mixup", "cutmix", "label_smoothing", "resolution")
"""Recipe keys of whole-image classification that the trainer's shared loop does not apply itself: the
label keys, and the progressive-resizing schedule (the classification pipelines read it)."""


class DenseTask:
    """What the transfer tasks share: no mixup and no recipe criterion (the task computes its own losses),
    FLOPs counted at ``data.img_size`` (the training crop, or the short side a detector resizes to)."""

    def build_mixup(self, cfg: DictConfig) -> None:
        """None: masks and boxes are not mixed."""
        return None

    def build_criterion(self, cfg: DictConfig, mixup) -> None:
        """None: :meth:`loss` computes the task's own losses."""
        return None

    def flops_input(self, cfg: DictConfig) -> int:
        """A square of ``data.img_size``."""
        return int(cfg.data.img_size)


def recipe_keys(*label_keys: str) -> frozenset[str]:
    """The recipe keys a task honours: every key of the recipe schema (optimiser, schedule, length, EMA,
    clipping: the shared loop applies them) except the label keys, plus ``label_keys``."""
    import dataclasses

    from acon.config_schema import RecipeSchema

    names = {f.name for f in dataclasses.fields(RecipeSchema)}
    return frozenset(names - set(LABEL_RECIPE_KEYS) | set(label_keys))


def check_recipe_keys(cfg: DictConfig, task_name: str, honoured: Collection[str] | None) -> None:
    """A recipe key the task does not use, set away from its schema default, is an error (one line)."""
    import dataclasses

    from acon.config_schema import RecipeSchema

    if honoured is None:
        return
    ignored = []
    for f in dataclasses.fields(RecipeSchema):
        if f.name in honoured or f.name not in cfg.recipe:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if cfg.recipe[f.name] != default:
            ignored.append(f"recipe.{f.name}={cfg.recipe[f.name]}")
    if ignored:
        raise ConfigError(
            f"task={task_name} does not use {', '.join(ignored)}: leave "
            f"{'it' if len(ignored) == 1 else 'them'} at the default (it honours recipe."
            f"{{{','.join(sorted(honoured))}}})"
        )


def uniform_batch_size(sizes: Iterable[tuple[int, int]], requested: int) -> int:
    """``requested`` when every image has one size, else 1: images of several sizes are never padded
    together, so metrics do not depend on the batch size or on a batch's neighbours."""
    return requested if len(set(sizes)) <= 1 else 1


def is_better(task: Task, value: float, best: float | None) -> bool:
    """True when ``value`` beats ``best`` (None: nothing yet) in the task's direction."""
    if best is None:
        return True
    return value > best if task.higher_is_better else value < best


def best_entry(task: Task, metrics: dict, epoch: int | float, step: int) -> dict:
    """What ``Progression.best`` keeps: the scalar metrics (loss aside), the epoch and the step."""
    return {**{k: metrics[k] for k in task.scalar_metrics if k != "loss"}, "epoch": epoch, "step": step}


def unprefixed(record: dict, prefix: str = "val_") -> dict:
    """The ``val_*`` entries of an epoch record without their prefix."""
    return {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}


def transfer_result_fields(task: Task, final: dict, best: dict | None, extra: tuple[str, ...] = ()) -> dict:
    """results.json entries of a transfer task: each scalar metric (and ``extra`` keys), the best primary
    metric and its epoch (``best_<metric>``, ``best_epoch``)."""
    pm = task.primary_metric
    out = {k: final[k] for k in (*task.scalar_metrics, *extra) if k in final and k != "loss"}
    best = best or {pm: final[pm], "epoch": final.get("epoch")}
    out.update({f"best_{pm}": best[pm], "best_epoch": best["epoch"]})
    return out
