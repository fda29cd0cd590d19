"""Tasks behind the shared trainer: ``get_task(name)`` over classification, segmentation and detection.

Modules are imported on first use, so classification never imports a detection or segmentation library.
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from acon.tasks.base import Task

TASKS = {
    "classification": "acon.tasks.classification:ClassificationTask",
    "segmentation": "acon.tasks.segmentation:SegmentationTask",
    "detection": "acon.tasks.detection:DetectionTask",
}
DEFAULT_TASK = "classification"

__all__ = ["DEFAULT_TASK", "TASKS", "Task", "get_task", "task_of", "task_names"]


def task_names() -> list[str]:
    """Every valid ``task.name``."""
    return list(TASKS)


def get_task(name: str, cfg: DictConfig | None = None) -> Task:
    """The task called ``name`` (a new instance), its state built from the run config ``cfg`` (None: only
    its names and the words of its metrics)."""
    if name not in TASKS:
        raise ValueError(f"task.name={name!r} is not one of: {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)


def task_of(cfg: DictConfig | dict) -> Task:
    """The task of a run config, built from it (configs written before the ``task`` group are
    classification)."""
    node = cfg.get("task") if hasattr(cfg, "get") else None
    name = node.get("name") if node is not None and hasattr(node, "get") else None
    return get_task(str(name or DEFAULT_TASK), cfg if isinstance(cfg, DictConfig) else None)
