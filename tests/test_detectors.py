"""RetinaNet and Faster R-CNN built on our backbones (any activation) and on a timm features_only model."""

from __future__ import annotations

import pytest
import timm
import torch

import models
from acon.detection.detectors import anchor_generator, build_detector, level_strides

pytestmark = pytest.mark.usefixtures("one_thread")


def _targets(n: int = 2) -> list[dict]:
    box = torch.tensor([[8.0, 10.0, 40.0, 44.0]])
    return [{"boxes": box + i, "labels": torch.tensor([1 + i % 2])} for i in range(n)]


def _train_step(det: torch.nn.Module, size: int = 64) -> dict:
    det.train()
    losses = det([torch.rand(3, size, size) for _ in range(2)], _targets())
    sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize(
    "kind,model,activation,losses",
    [
        ("fasterrcnn", "shufflenetv2_x0_5", "meta_acon", {"loss_classifier", "loss_objectness"}),
        ("retinanet", "resnet18", "acon_c", {"classification", "bbox_regression"}),
    ],
)
def test_detector_trains_on_our_backbone(kind, model, activation, losses):
    torch.manual_seed(0)
    body = models.create_model(model, activation, features_only=True, out_indices=(2, 3, 4))
    det = build_detector(kind, body, num_classes=3, min_size=64, max_size=64, fpn_channels=32)
    out = _train_step(det)
    assert losses <= set(out) and all(torch.isfinite(v) for v in out.values())
    acon = next(m for m in body.modules() if hasattr(m, "p1"))
    assert acon.p1.grad is not None and acon.p1.grad.abs().sum() > 0  # gradients reach the activation
    det.eval()
    with torch.no_grad():
        [pred] = det([torch.rand(3, 64, 64)])
    assert set(pred) == {"boxes", "scores", "labels"} and ((pred["labels"] >= 1) & (pred["labels"] < 3)).all()


def test_detector_on_a_timm_features_only_model():
    torch.manual_seed(0)
    body = timm.create_model("mobilenetv2_050", pretrained=False, features_only=True, out_indices=(2, 3, 4))
    det = build_detector("retinanet", body, num_classes=3, min_size=64, max_size=64, fpn_channels=16)
    assert level_strides(body, "retinanet") == [8, 16, 32, 64, 128]
    assert all(torch.isfinite(v) for v in _train_step(det).values())


def test_anchors_follow_the_strides():
    fr = anchor_generator([4, 8, 16], "fasterrcnn")
    assert fr.sizes == ((32.0,), (64.0,), (128.0,))  # torchvision's 32 px at stride 4
    rn = anchor_generator([8, 16], "retinanet", anchor_scale=2)
    assert rn.sizes[0] == pytest.approx((16.0, 16 * 2 ** (1 / 3), 16 * 2 ** (2 / 3)))
    assert rn.num_anchors_per_location() == [9, 9]


def test_builder_refuses_unknown_kinds_and_plain_classifiers():
    with pytest.raises(ValueError, match="not one of"):
        build_detector("yolo", models.create_model("resnet18", features_only=True), 3)
    with pytest.raises(ValueError, match="features_only"):
        build_detector("fasterrcnn", models.create_model("resnet18"), 3)


@pytest.mark.parametrize("kind", ["retinanet", "fasterrcnn"])
def test_boxes_are_decoded_and_suppressed_in_fp32_under_bf16_autocast(kind):
    """torchvision decodes boxes in its heads' dtype and offsets them by class (or level) before NMS: in
    bf16 those offsets are 512 px apart near class 80, and NMS stops suppressing (the paper detection
    experiments run in bf16). The heads' outputs are fp32; the backbone still runs in bf16."""
    torch.manual_seed(0)
    body = models.create_model("resnet18", "acon_c", features_only=True, out_indices=(2, 3, 4))
    det = build_detector(kind, body, num_classes=81, min_size=64, max_size=64, fpn_channels=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _train_step(det)
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
        det.eval()
        with torch.no_grad():
            [pred] = det([torch.rand(3, 64, 64)])
            features = det.backbone(torch.rand(1, 3, 64, 64))
    assert pred["boxes"].dtype == torch.float32 and pred["scores"].dtype == torch.float32
    assert all(f.dtype == torch.bfloat16 for f in features.values())
