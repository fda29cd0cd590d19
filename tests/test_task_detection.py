"""task=detection behind the Task protocol: configs, checks, model, loss and evaluation on a tiny shapes set."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import compose, run_cli
from torch import nn

from acon.distributed import DistInfo
from acon.errors import ConfigError
from acon.optim import step_lrs
from acon.tasks import get_task
from acon.tasks.detection import Detector

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("det") / "shapes"
    return lambda *extra: compose(
        [
            "task=detection",
            f"data.root={root}",
            "data.train_samples=8",
            "data.val_samples=6",
            "recipe.batch_size=4",
            "recipe.base_batch_size=4",
            "trainer.eval_batch_size=4",
            *extra,
        ]
    )


def test_task_detection_selects_the_embedded_defaults():
    cfg = compose(["task=detection"])
    assert (cfg.task.name, cfg.data.name, cfg.recipe.name, cfg.model.name) == (
        "detection",
        "det_shapes",
        "det_shapes",
        "shufflenetv2_x0_5",
    )
    assert compose(["task=detection", "model=resnet18", "task.detector=fasterrcnn"]).model.name == "resnet18"
    assert compose([]).task.name == "classification" and compose([]).data.name == "digits"


def test_config_errors_name_the_key():
    task = get_task("detection")
    with pytest.raises(ConfigError, match="data=digits .*is not one of"):
        task.check_config(compose(["task=detection", "data=digits"]))
    with pytest.raises(ConfigError, match="data.root is not set for data=coco"):
        task.check_config(compose(["task=detection", "data=coco", "data.root=null"]))


class Oracle(nn.Module):
    """Returns the ground truth of each validation image as its detections (score 1)."""

    def __init__(self, truth: dict) -> None:
        super().__init__()
        self.truth, self.dummy = truth, nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return [self.truth[tuple(i.shape) + (float(i.sum()),)] for i in images]


def test_evaluate_gives_100_ap_for_the_ground_truth(tiny_cfg):
    cfg, task = tiny_cfg(), get_task("detection")
    loader = task.build_val_loader(cfg, 4, DistInfo(), {})
    truth = {}
    for images, targets, _ in loader:
        for img, t in zip(images, targets, strict=True):
            n = len(t["labels"])
            truth[tuple(img.shape) + (float(img.sum()),)] = {**t, "scores": torch.ones(n)}
    metrics = task.evaluate(Oracle(truth), loader, cfg, DistInfo())
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert metrics["count"] == 6 and metrics["bad_images_skipped"] == 0
    assert set(task.scalar_metrics) <= set(metrics)


@pytest.mark.parametrize("detector,model", [("fasterrcnn", "resnet18"), ("retinanet", "shufflenetv2_x0_5")])
def test_model_trains_and_evaluates(tiny_cfg, detector, model):
    cfg, task = (
        tiny_cfg(f"task.detector={detector}", f"model={model}", "activation=meta_acon"),
        get_task("detection"),
    )
    torch.manual_seed(0)
    net = task.build_model(cfg)
    assert isinstance(net, Detector)
    train, val, n = task.build_loaders(cfg, DistInfo())
    assert n == 8
    images, targets, n_bad = next(iter(train))
    ctx = type("Ctx", (), {"model": net, "device": torch.device("cpu"), "precision": "fp32"})()
    loss = task.loss(ctx, images, targets)
    assert loss.dim() == 0 and torch.isfinite(loss) and n_bad == 0
    loss.backward()
    metrics = task.evaluate(net, val, cfg, DistInfo())
    assert metrics["count"] == 6 and 0 <= metrics["AP"] <= 100
    feats = net(task.sample_input(images))  # a tensor batch: backbone + FPN only (FLOPs, β probes)
    assert all(f.shape[0] == len(images) for f in feats)


def test_step_schedule_drops_at_the_given_steps():
    cfg = compose(["task=detection", "recipe.warmup_steps=0", "recipe.lr_steps=[5,8]"])
    assert step_lrs(cfg.recipe, 10, [1, 4, 5, 7, 8, 10]) == pytest.approx(
        [0.02, 0.02, 2e-3, 2e-3, 2e-4, 2e-4]
    )
    half = compose(["task=detection", "recipe.warmup_steps=0", "recipe.lr_steps=[8]", "recipe.batch_size=16"])
    assert step_lrs(half.recipe, 10, [3, 4]) == pytest.approx([0.04, 0.004])  # steps scale with the batch


def test_pycocotools_is_imported_only_to_evaluate():
    """Classification (and building a detector) never import pycocotools; the COCO metrics do."""
    code = (
        "import sys; from acon.tasks import get_task; get_task('classification'); get_task('detection'); "
        "import acon.detection.dataset, acon.detection.detectors; assert 'pycocotools' not in sys.modules; "
        "import acon.detection.metrics as m; m.coco_ground_truth({'images': [], 'annotations': [], "
        "'categories': []}); assert 'pycocotools' in sys.modules"
    )
    run_cli([sys.executable, "-c", code])


def test_images_of_other_sizes_are_validated_one_at_a_time(tiny_cfg):
    from acon.detection.dataset import build_split

    cfg = tiny_cfg("task.eval_batch_size=4")
    task, info = get_task("detection", cfg), DistInfo()
    dataset = build_split(cfg.data, "val", train=False)
    assert task._val_loader(dataset, cfg, 4, info).batch_size == 4  # one size: batched
    dataset.index.records[0].width += 2  # another size in the split: one image a batch
    assert task._val_loader(dataset, cfg, 4, info).batch_size == 1


def test_retinanet_gets_its_own_default_run_name():
    """Before: task.detector=retinanet trained into Faster R-CNN's run dir (and was refused there)."""
    faster = compose(["task=detection"]).run_name
    retina = compose(["task=detection", "task.detector=retinanet"]).run_name
    assert faster == "det_shapes-shufflenetv2_x0_5-acon_c-s0"  # unchanged: existing run dirs resume
    assert retina == "det_shapes-shufflenetv2_x0_5-acon_c-retinanet-s0"
    coco = compose(["task=detection_coco", "data=coco", "model=resnet50", "seed=1"]).run_name
    assert coco == "coco-resnet50-acon_c-retinanet-s1"
    assert compose(["task=segmentation"]).run_name == "seg_shapes-shufflenetv2_x0_5_small-acon_c-s0"
    assert compose([]).run_name == "digits-shufflenetv2_x0_5_small-acon_c-s0"
