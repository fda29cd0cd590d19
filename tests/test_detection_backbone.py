"""Our backbones under torchvision detectors (FPN + RetinaNet / Faster R-CNN), CPU forward at 128 px."""

import pytest
import torch
from torchvision.models.detection import FasterRCNN, RetinaNet

import models
from models.features import FPNBackbone

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_detections(out: list[dict], num_classes: int) -> None:
    assert len(out) == 1 and set(out[0]) == {"boxes", "scores", "labels"}
    boxes = out[0]["boxes"]
    assert boxes.shape[1:] == (4,) and torch.isfinite(boxes).all()
    assert ((out[0]["labels"] >= 0) & (out[0]["labels"] < num_classes)).all()


def test_retinanet_on_resnet18_acon():
    torch.manual_seed(0)
    backbone = models.build_fpn_backbone(
        "resnet18", "acon_c", out_indices=(2, 3, 4), out_channels=32, extra_p6p7=True
    )
    feats = backbone(torch.randn(1, 3, 128, 128))
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]  # P3-P7
    assert all(f.shape[1] == 32 for f in feats.values())
    model = RetinaNet(backbone, num_classes=3, min_size=128, max_size=128).eval()
    with torch.no_grad():
        _check_detections(model([torch.rand(3, 128, 128)]), 3)


def test_faster_rcnn_on_shufflenetv2_meta_acon():
    torch.manual_seed(0)
    body = models.create_model("shufflenetv2_x0_5", "meta_acon", features_only=True, out_indices=(1, 2, 3, 4))
    assert body.feature_info.channels() == [48, 96, 192, 1024]
    backbone = FPNBackbone(body, out_channels=32)
    model = FasterRCNN(
        backbone,
        num_classes=4,
        min_size=128,
        max_size=128,
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
    ).eval()
    with torch.no_grad():
        _check_detections(model([torch.rand(3, 128, 128)]), 4)


def test_fpn_backbone_trains():
    """Gradients reach the backbone's activation parameters through the FPN."""
    backbone = models.build_fpn_backbone("resnet18", "acon_c", out_indices=(3, 4), out_channels=16)
    sum(f.mean() for f in backbone(torch.randn(2, 3, 64, 64)).values()).backward()
    assert backbone.body.layer4[1].acon2.p1.grad.abs().sum() > 0
    assert backbone.body.fc is None


def test_fpn_backbone_needs_features_only():
    with pytest.raises(ValueError, match="features_only"):
        FPNBackbone(models.create_model("resnet18"))
