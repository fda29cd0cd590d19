"""The ``Task`` protocol: what a task (classification, segmentation, detection) gives the shared trainer.

The trainer (``acon.trainer``), ``eval.py`` (``acon.evaluation``), results.json, metrics.jsonl, TensorBoard,
best.pt selection, the epoch line and ``scripts/make_table.py`` call these methods and never branch on a
task's name. A task is one small module under ``acon/tasks/``: its model, loss, evaluation and metrics.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from omegaconf import DictConfig
from torch import nn


@runtime_checkable
class Task(Protocol):
    """One kind of training problem, behind the shared machinery.

    Loaders yield ``(inputs, targets, n_bad)``: ``inputs`` an NCHW tensor (or a list of CHW tensors for
    detection), ``targets`` a tensor (or a list of dicts), ``n_bad`` the skipped bad images of the batch
    (an int, or ``acon.data.bad_images.BadImages`` with the files).
    """

    name: str  # "classification" | "segmentation" | "detection"
    primary_metric: str  # key of evaluate()'s dict used for best.pt and tables: "top1_err" | "mIoU" | "AP"
    higher_is_better: bool  # False for top1_err, True for mIoU / AP
    scalar_metrics: tuple[str, ...]  # evaluate() keys logged as TensorBoard val/<key>, kept in best, EMA'd
    # Metrics are in percent (top-1 error %, mIoU %, AP x 100): the epoch line prints "best <value>%".

    def check_config(self, cfg: DictConfig) -> None:
        """Task-specific config checks, before any data is read or model built (raise ConfigError)."""

    def identity(self, cfg: DictConfig) -> dict:
        """Entries added to the run identity a resumed run must share (empty: nothing beyond the model)."""

    def build_loaders(self, cfg: DictConfig, info) -> tuple[Any, Any, int]:
        """(train loader, val loader, training-set size); ``info`` is ``acon.distributed.DistInfo``."""

    def build_val_loader(self, cfg: DictConfig, batch_size: int, info, cache: dict) -> Any:
        """eval.py's loader over ``cfg.data``'s validation split only (``cache`` keeps datasets by key)."""

    def build_model(self, cfg: DictConfig) -> nn.Module:
        """The whole network (backbone + head) from the ``model``, ``activation``, ``task`` and data groups."""

    def loss(self, ctx, inputs, targets) -> torch.Tensor:
        """Forward under autocast (``ctx``: ``acon.engine.StepContext``), the scalar fp32 training loss."""

    def evaluate(self, model: nn.Module, loader, cfg: DictConfig, info) -> dict:
        """Metrics over the whole val set across ranks; has ``primary_metric``, every ``scalar_metrics``
        key, ``count``, ``bad_images_skipped`` and ``bad_image_files`` (this rank's)."""

    def sample_input(self, inputs) -> torch.Tensor | None:
        """A small NCHW batch of ``inputs`` for β statistics, or None."""

    def metrics_text(self, metrics: dict) -> str:
        """The metrics in words for the epoch line and eval.py, e.g. ``top-1 2.79% top-5 0.00%``."""

    def result_fields(self, final: dict, best: dict | None) -> dict:
        """The task's entries of results.json from the final validation (unprefixed keys) and the best."""


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
