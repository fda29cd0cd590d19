"""Segmentation metrics from a confusion matrix: mIoU and pixel accuracy, ignore label left out."""

from __future__ import annotations

import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """``(K, K)`` counts, rows the true class, columns the predicted one; pixels labelled ``ignore_index``
    are left out."""
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: torch.Tensor) -> list[float | None]:
    """IoU (%) of each class, TP / (TP + FP + FN); None for a class neither present nor predicted."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return [
        None if u == 0 else float(100.0 * t / u) for t, u in zip(tp.tolist(), union.tolist(), strict=True)
    ]


def segmentation_scores(conf: torch.Tensor, names: list[str] | None = None) -> dict:
    """``mIoU`` (mean over classes that occur in the labels or the predictions), ``pixel_acc`` (%),
    ``iou_per_class`` and ``iou_by_class`` ({class name: IoU}; ``class_<i>`` without ``names``)."""
    ious = iou_per_class(conf)
    names = names or [f"class_{i}" for i in range(len(ious))]
    present = [v for v in ious if v is not None]
    total = float(conf.sum())
    return {
        "mIoU": sum(present) / len(present) if present else 0.0,
        "pixel_acc": 100.0 * float(conf.diag().sum()) / total if total else 0.0,
        "iou_per_class": ious,
        "iou_by_class": dict(zip(names, ious, strict=True)),
    }
