"""COCO-format reading: targets, contiguous labels, every bad-input rule, and the embedded shapes set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from acon.data.bad_images import BadImageError
from acon.detection.coco import CocoIndex
from acon.detection.dataset import CocoDetectionDataset, collate_detection
from acon.detection.shapes import CATEGORIES, prepare_shapes
from acon.errors import ConfigError


def write_coco(
    root: Path, anns: list[dict], images=((1, "a.png", 40, 30), (2, "b.jpg", 40, 30)), cats=(3, 7)
):
    """Real image files and an instances JSON under ``root``; returns the JSON's path."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for _, name, w, h in images:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "img" / name)
    doc = {
        "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in images],
        "annotations": [{"iscrowd": 0, **a} for a in anns],
        "categories": [{"id": c, "name": f"c{c}"} for c in cats],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def ann(aid: int, image_id: int, cat: int, bbox: list) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox}


def test_targets_are_torchvision_style_with_contiguous_labels(tmp_path):
    path = write_coco(
        tmp_path, [ann(1, 1, 7, [2, 3, 10, 5]), ann(2, 1, 3, [0, 0, 4, 4]), ann(3, 2, 7, [1, 1, 2, 2])]
    )
    index = CocoIndex(path, tmp_path / "img")
    assert index.labels == {3: 1, 7: 2} and index.label_to_category == {1: 3, 2: 7}
    assert index.num_classes == 3
    image, target = CocoDetectionDataset(index)[0]
    assert (
        image.shape == (3, 30, 40) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    )
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [0, 0, 4, 4]]
    assert target["labels"].tolist() == [2, 1] and target["image_id"] == 1
    assert target["area"].tolist() == [50, 16]


def test_hflip_mirrors_boxes(tmp_path):
    path = write_coco(tmp_path, [ann(1, 1, 3, [2, 3, 10, 5]), ann(2, 2, 3, [1, 1, 2, 2])])
    ds = CocoDetectionDataset(CocoIndex(path, tmp_path / "img"), train=True, hflip_prob=1.0)
    image, target = ds[0]
    plain, _ = CocoDetectionDataset(ds.index)[0]
    assert torch.equal(image, plain.flip(-1))
    assert target["boxes"].tolist() == [[28, 3, 38, 8]]


def test_boxes_outside_the_image_are_clipped_and_counted(tmp_path):
    anns = [ann(1, 1, 3, [-5, 2, 10, 5]), ann(2, 1, 3, [35, 20, 20, 20]), ann(3, 2, 3, [50, 50, 5, 5])]
    index = CocoIndex(write_coco(tmp_path, anns), tmp_path / "img")
    assert index.records[0].boxes == [[0, 2, 5, 7], [35, 20, 40, 30]]
    assert (index.stats.boxes_clipped, index.stats.degenerate_boxes_dropped) == (2, 1)
    assert index.stats.empty_images_kept == 1 and len(index.records) == 2


def test_box_policy_raise_names_the_annotation_and_file(tmp_path):
    path = write_coco(tmp_path, [ann(41, 1, 3, [35, 20, 20, 20])])
    with pytest.raises(ConfigError, match=r"annotation id 41 \(image .*a\.png\).*outside the 40x30 image"):
        CocoIndex(path, tmp_path / "img", box_policy="raise")


def test_degenerate_boxes_dropped_or_refused(tmp_path):
    path = write_coco(
        tmp_path, [ann(1, 1, 3, [2, 2, 0, 5]), ann(2, 1, 3, [2, 2, 5, -1]), ann(3, 2, 3, [1, 1, 2, 2])]
    )
    index = CocoIndex(path, tmp_path / "img")
    assert index.stats.degenerate_boxes_dropped == 2 and index.records[0].boxes == []
    with pytest.raises(ConfigError, match="annotation id 1 .*has no area"):
        CocoIndex(path, tmp_path / "img", box_policy="raise")
    with pytest.raises(ConfigError, match=r"annotation id 5 .*4 finite numbers"):
        CocoIndex(write_coco(tmp_path, [ann(5, 1, 3, [1, 2, float("nan"), 3])]), tmp_path / "img")


def test_empty_images_kept_or_skipped_with_counts(tmp_path):
    path = write_coco(tmp_path, [ann(1, 2, 3, [1, 1, 5, 5]), {**ann(2, 1, 3, [1, 1, 5, 5]), "iscrowd": 1}])
    keep = CocoIndex(path, tmp_path / "img", empty_policy="keep")
    assert (
        len(keep.records) == 2 and keep.stats.empty_images_kept == 1 and keep.stats.crowd_regions_ignored == 1
    )
    skip = CocoIndex(path, tmp_path / "img", empty_policy="skip")
    assert [r.image_id for r in skip.records] == [2] and skip.stats.empty_images_skipped == 1
    _, target = CocoDetectionDataset(keep)[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_unknown_category_and_image_ids_are_errors(tmp_path):
    path = write_coco(tmp_path, [ann(9, 1, 5, [1, 1, 5, 5])])
    with pytest.raises(ConfigError, match=r"annotation id 9 \(image .*a\.png\): category_id 5 is not among"):
        CocoIndex(path, tmp_path / "img")
    path = write_coco(tmp_path, [ann(4, 12, 3, [1, 1, 5, 5])])
    with pytest.raises(ConfigError, match="annotation id 4: image_id 12 is not among the images"):
        CocoIndex(path, tmp_path / "img")


def test_repeated_annotation_ids_are_errors(tmp_path):
    path = write_coco(tmp_path, [ann(3, 1, 3, [1, 1, 5, 5]), ann(3, 2, 3, [1, 1, 5, 5])])
    with pytest.raises(ConfigError, match="annotation id 3: annotation ids must be unique"):
        CocoIndex(path, tmp_path / "img")


def test_missing_files_and_bad_json_are_errors_before_decoding(tmp_path):
    path = write_coco(tmp_path, [ann(1, 1, 3, [1, 1, 5, 5])])
    (tmp_path / "img" / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 image files listed in .* are missing: .*b\.jpg"):
        CocoIndex(path, tmp_path / "img")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoIndex(tmp_path / "nope.json", tmp_path / "img")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not a valid JSON"):
        CocoIndex(tmp_path / "broken.json", tmp_path / "img")
    (tmp_path / "cls.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ConfigError, match="not a COCO instances file"):
        CocoIndex(tmp_path / "cls.json", tmp_path / "img")


def test_undecodable_image_raises_or_is_skipped_and_counted(tmp_path):
    path = write_coco(tmp_path, [ann(1, 1, 3, [1, 1, 5, 5]), ann(2, 2, 3, [1, 1, 5, 5])])
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG broken")
    index = CocoIndex(path, tmp_path / "img")
    with pytest.raises(BadImageError, match=r"a\.png"):
        CocoDetectionDataset(index)[0]
    ds = CocoDetectionDataset(index, bad_image_policy="skip")
    with pytest.warns(UserWarning, match="skipping bad image"):
        images, targets, bad = collate_detection([ds[0], ds[1]])
    assert len(images) == len(targets) == 1 and bad == 1 and bad.files[0].endswith("a.png")


def test_embedded_shapes_set_is_a_real_coco_dataset(tmp_path):
    root = prepare_shapes(tmp_path / "shapes", train_images=6, val_images=4, size=48)
    assert prepare_shapes(tmp_path / "shapes", train_images=6, val_images=4, size=48) == root  # idempotent
    data = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert data["categories"] == CATEGORIES and len(data["images"]) == 4
    assert all(len(a["segmentation"][0]) >= 6 and a["area"] > 0 for a in data["annotations"])
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert sorted(p.suffix for p in (root / "train").iterdir()) == [".jpg"] * 6
    index = CocoIndex(root / "annotations" / "instances_train.json", root / "train", box_policy="raise")
    assert index.stats.boxes == len(
        json.loads((root / "annotations/instances_train.json").read_text())["annotations"]
    )
    image, target = CocoDetectionDataset(index)[0]
    assert image.shape == (3, 48, 48) and len(target["boxes"]) >= 1
    val = np.asarray(Image.open(root / "val" / data["images"][0]["file_name"]), dtype=np.float32)
    for a in (a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]):
        xy = np.array(a["segmentation"][0]).reshape(-1, 2)
        cx, cy = np.round(xy.mean(0)).astype(int)  # the centre of a regular polygon: filled, one colour
        assert val[cy - 1 : cy + 2, cx - 1 : cx + 2].std(axis=(0, 1)).max() == 0
        x, y, w, h = a["bbox"]
        assert np.allclose([x, y, x + w, y + h], [*xy.min(0), *xy.max(0)], atol=0.01)
