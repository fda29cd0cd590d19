"""pycocotools' COCOeval against numbers computed by hand, and the conversion of detector outputs."""

from __future__ import annotations

import pytest
import torch

from acon.detection.metrics import coco_box_metrics, coco_ground_truth, to_coco_results


def tiny_gt() -> dict:
    """One 200x200 image with two 60x60 boxes of category 5 (medium: 32² < 3600 < 96²)."""
    return {
        "images": [{"id": 1, "file_name": "x.png", "width": 200, "height": 200}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 60, 60], "area": 3600, "iscrowd": 0},
            {
                "id": 2,
                "image_id": 1,
                "category_id": 5,
                "bbox": [100, 100, 60, 60],
                "area": 3600,
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 5, "name": "thing"}],
    }


def test_ap_equals_the_hand_computed_value():
    """Detections by score: d1 hits A exactly, d2 hits nothing, d3 overlaps B with IoU 48/72 = 2/3.

    At the 4 IoU thresholds 0.50-0.65 d3 is a true positive: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1;
    interpolated (max to the right) 1, 2/3, 2/3. Of COCO's 101 recall points, the 51 up to 0.50 read 1
    and the 50 above read 2/3: AP_t = (51 + 50·2/3) / 101. At the 6 thresholds 0.70-0.95 only d1 counts:
    recall stops at 1/2, AP_t = 51/101. AP is the mean over the 10 thresholds.
    """
    dets = [
        {"image_id": 1, "category_id": 5, "bbox": [10, 10, 60, 60], "score": 0.9},
        {"image_id": 1, "category_id": 5, "bbox": [130, 10, 40, 40], "score": 0.8},
        {"image_id": 1, "category_id": 5, "bbox": [112, 100, 60, 60], "score": 0.7},
    ]
    high, low = (51 + 50 * 2 / 3) / 101, 51 / 101
    m = coco_box_metrics(coco_ground_truth(tiny_gt()), dets)
    assert m["AP50"] == pytest.approx(100 * high, abs=1e-6)
    assert m["AP75"] == pytest.approx(100 * low, abs=1e-6)
    assert m["AP"] == pytest.approx(100 * (4 * high + 6 * low) / 10, abs=1e-6)  # 63.696...
    assert m["APm"] == pytest.approx(m["AP"], abs=1e-6)
    assert m["APs"] == m["APl"] == -1.0  # no ground truth in those area ranges


def test_perfect_and_empty_predictions():
    gt = coco_ground_truth(tiny_gt())
    perfect = [
        {**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": 1.0}
        for a in tiny_gt()["annotations"]
    ]
    assert coco_box_metrics(gt, perfect)["AP"] == pytest.approx(100.0)
    assert coco_box_metrics(gt, [])["AP"] == 0.0


def test_detector_outputs_become_coco_results():
    out = {
        "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]),
        "scores": torch.tensor([0.5]),
        "labels": torch.tensor([2]),
    }
    [r] = to_coco_results([out], [7], {1: 3, 2: 9})
    assert r == {"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}
    background = {**out, "labels": torch.tensor([0])}  # RetinaNet scores label 0 too: not a category
    assert to_coco_results([background], [7], {1: 3, 2: 9}) == []
