"""Detection experiments (detector x backbone x activation) and the COCO 1x recipe."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import CONFIGS, compose

from acon.activations import AconC, MetaAconC, Swish
from acon.optim import step_lrs, total_steps

DETECTORS = ("retinanet", "fasterrcnn")
BACKBONES = ("resnet50", "shufflenetv2_x1_5")
ACTIVATIONS = ("relu", "swish", "acon_c", "meta_acon")
CELLS = [f"{d}_{b}_{a}" for d in DETECTORS for b in BACKBONES for a in ACTIVATIONS]


def header(name: str) -> dict[str, str]:
    out = {}
    for line in (CONFIGS / "experiment" / "detection" / f"{name}.yaml").read_text().splitlines():
        m = re.match(r"#\s*([A-Za-z][\w\- ()%]*?):\s*(.*)$", line)
        if m:
            out[m.group(1).strip()] = m.group(2).strip()
    return out


def test_one_file_per_cell():
    assert sorted(p.stem for p in (CONFIGS / "experiment" / "detection").glob("*.yaml")) == sorted(CELLS)


def parts(name: str) -> tuple[str, str, str]:
    """(detector, backbone, activation) of a cell name."""
    det, act = name.split("_")[0], next(a for a in ACTIVATIONS if name.endswith("_" + a))
    return det, name[len(det) + 1 : -len(act) - 1], act


@pytest.mark.parametrize("name", CELLS)
def test_header_states_command_hardware_hours_and_no_paper_number(name):
    _, backbone, act = parts(name)
    h = header(name)
    assert (
        f"experiment=detection/{name}" in h["Command"]
        and f"imagenet-{backbone}-{act}-s0/best.pt" in h["Command"]
    )
    assert "A100" in h["Hardware"] and "COCO" in h["Hardware"]
    assert re.match(r"\d+ \(estimate", h["Expected GPU-hours"])
    assert h["Paper AP (%)"] == ""  # the paper's transfer numbers are not available as text: left empty


COMPOSED = ["retinanet_resnet50_acon_c", "fasterrcnn_shufflenetv2_x1_5_meta_acon"]


@pytest.mark.parametrize(
    "name", [n if n in COMPOSED else pytest.param(n, marks=pytest.mark.slow) for n in CELLS]
)
def test_experiment_composes(name):
    det, backbone, act = parts(name)
    cfg = compose([f"experiment=detection/{name}", "seed=1"])
    assert (cfg.task.name, cfg.task.detector, cfg.model.name, cfg.activation.name) == (
        "detection",
        det,
        backbone,
        act,
    )
    recipe = "coco_1x_retinanet" if det == "retinanet" else "coco_1x"  # Base-RetinaNet / Base-RCNN-FPN
    assert (cfg.data.name, cfg.recipe.name, cfg.data.img_size, cfg.data.max_size) == (
        "coco",
        recipe,
        800,
        1333,
    )
    assert cfg.recipe.lr == (0.01 if det == "retinanet" else 0.02)
    assert cfg.backbone.freeze_bn and not cfg.backbone.freeze_acon
    assert cfg.run_name == f"coco-{det}-{backbone}-{act}-s1"


@pytest.mark.parametrize("name", ["retinanet_resnet50_meta_acon", "fasterrcnn_shufflenetv2_x1_5_swish"])
def test_experiment_builds_its_detector(name):
    from acon.tasks import get_task

    cfg = compose([f"experiment=detection/{name}"])
    with torch.device("meta"):
        net = get_task("detection").build_model(cfg)
    kinds = {type(m) for m in net.modules()}
    want = MetaAconC if name.endswith("meta_acon") else Swish
    assert want in kinds and AconC not in kinds
    assert net.net.backbone.out_channels == 256 and type(net.net).__name__ in ("RetinaNet", "FasterRCNN")


def test_coco_1x_schedule():
    recipe = compose(["experiment=detection/retinanet_resnet50_relu"]).recipe
    assert total_steps(recipe, 7000) == 90000
    lrs = step_lrs(recipe, 90000, [1, 1000, 1001, 59999, 60000, 79999, 80000, 90000])
    assert lrs[0] < 1e-4 and lrs[2:4] == pytest.approx([0.01, 0.01])
    assert lrs[4:] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    doubled = compose(["experiment=detection/retinanet_resnet50_relu", "recipe.batch_size=32"]).recipe
    assert total_steps(doubled, 1) == 45000 and step_lrs(doubled, 45000, [29999, 30000]) == pytest.approx(
        [0.02, 2e-3]
    )
