"""What runs report: no top-5 error of 5 classes or fewer, no ± for one seed, per-class IoU with class
names, and a warning when a checkpoint's stem differs from the backbone's."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf
from torch import nn

from acon import checkpoint as ckpt
from acon.console import eval_line, summary_lines
from acon.table_render import to_csv, to_latex, to_markdown
from acon.tables import Cell
from acon.tasks import get_task


def _loader(classes: int, n: int = 12):
    torch.manual_seed(0)
    return [(torch.randn(n, classes), torch.randint(0, classes, (n,)), 0)]


@pytest.mark.parametrize("classes, has_top5", [(3, False), (5, False), (6, True), (10, True)])
def test_top5_only_with_more_than_five_classes(classes, has_top5):
    task = get_task("classification")
    cfg = OmegaConf.create({"trainer": {"precision": "fp32", "channels_last": False}})
    info = SimpleNamespace(device=torch.device("cpu"))
    metrics = task.evaluate(nn.Identity(), _loader(classes), cfg, info)
    assert ("top5_err" in metrics) is has_top5
    assert ("top5_err" in task.scalar_metrics) is has_top5  # nothing logged to TensorBoard or kept in best
    text = task.metrics_text(metrics)
    assert ("top-5" in text) is has_top5 and text.startswith("top-1 err ")
    fields = task.result_fields({**metrics, "epoch": 1}, None)
    assert ("top5_err" in fields) is has_top5
    summary = summary_lines({**fields, "status": "complete", "wall_time_s": 1.0}, "runs/x")[0]
    assert ("top-5" in summary) is has_top5 and "final top-1 error" in summary
    row = {"checkpoint": "best.pt", **metrics}
    assert ("top-5" in eval_line(row)) is has_top5


def test_one_seed_shows_no_spread():
    cells = [
        Cell("imagenet", "m", "relu", [30.0], [0], []),
        Cell("imagenet", "m", "acon_c", [30.0, 31.0], [0, 1], []),
    ]
    md = to_markdown(cells)
    assert "| 30.00 (n=1) | 30.50 ± 0.71 (n=2) |" in md and "± 0.00" not in md
    tex = to_latex(cells)
    assert "$30.00$ (1)" in tex and r"$30.50 \pm 0.71$ (2)" in tex
    rows = to_csv(cells).splitlines()
    assert rows[1].split(",")[4:6] == ["30.0000", ""] and rows[2].split(",")[5] == "0.7071"


def test_per_class_iou_carries_class_names():
    from acon.data.seg_classes import class_names
    from acon.tasks.seg_metrics import segmentation_scores

    conf = torch.tensor([[5, 1, 0, 0], [0, 3, 0, 0], [0, 0, 0, 0], [1, 0, 0, 2]])
    scores = segmentation_scores(conf, class_names("seg_shapes", 4))
    assert list(scores["iou_by_class"]) == ["background", "square", "disc", "triangle"]
    assert scores["iou_by_class"]["disc"] is None and scores["iou_by_class"]["square"] == pytest.approx(75.0)
    assert class_names("voc", 21)[15] == "person" and class_names("cityscapes", 19)[0] == "road"
    assert class_names("folder", 3) == ["class_0", "class_1", "class_2"]
    task = get_task("segmentation")
    assert "iou_by_class" in task.result_fields(
        {"mIoU": 1.0, "pixel_acc": 2.0, "iou_by_class": {}, "epoch": 1}, None
    )


def test_small_stem_checkpoint_into_a_normal_stem_backbone_warns(tmp_path, caplog):
    from acon.tasks.backbone import build_backbone

    small = compose(["model=shufflenetv2_x0_5_small", "activation=relu", "data.num_classes=5"])
    model = get_task("classification").build_model(small)
    state = {"format": ckpt.FORMAT, "model": model.state_dict(), "config": OmegaConf.to_container(small)}
    ckpt.atomic_save(state, tmp_path / "best.pt")
    for name, warns in (("shufflenetv2_x0_5", True), ("shufflenetv2_x0_5_small", False)):
        cfg = compose([f"model={name}", "activation=relu", f"backbone.checkpoint={tmp_path / 'best.pt'}"])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="acon"):
            build_backbone(cfg, (2, 3))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(warnings) is warns, warnings
        if warns:
            assert "small-input stem" in warnings[0] and "pass model=shufflenetv2_x0_5_small" in warnings[0]
