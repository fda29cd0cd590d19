"""Segmentation pieces on real files: VOC/Cityscapes layouts, bad input, transforms, metrics, config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose
from PIL import Image

from acon.data.bad_images import BadImageError
from acon.data.seg_shapes import prepare_seg_shapes
from acon.errors import ConfigError
from acon.tasks.seg_metrics import confusion_matrix, segmentation_scores


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small embedded set (VOC layout) written by the generator itself."""
    return prepare_seg_shapes(tmp_path_factory.mktemp("shapes") / "voc", train=12, val=4, size=32)


def seg_cfg(root, *extra):
    return compose(
        ["task=segmentation", f"data.root={root}", "data.train_samples=12", "data.val_samples=4"]
        + ["data.shapes_size=32", "data.img_size=32", *extra]
    )


def test_miou_and_pixel_accuracy_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, target, 3, 255)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # the two 255 pixels are left out
    s = segmentation_scores(conf)
    # IoU: class 0 1/(2+2-1)=1/3, class 1 2/(2+3-2)=2/3, class 2 1/(2+1-1)=1/2
    assert s["iou_per_class"] == pytest.approx([100 / 3, 200 / 3, 50.0])
    assert s["mIoU"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3) and s["pixel_acc"] == pytest.approx(
        400 / 6
    )
    absent = segmentation_scores(confusion_matrix(pred[:1, :2], target[:1, :2], 3, 255))
    assert absent["iou_per_class"][2] is None  # neither present nor predicted: not in the mean


def test_embedded_set_is_a_voc_layout_read_by_the_voc_loader(shapes):
    from acon.tasks.segmentation import build_seg_dataset

    assert (shapes / "ImageSets/Segmentation/train.txt").read_text().split() == [
        f"train_{i:05d}" for i in range(12)
    ]
    mask = Image.open(shapes / "SegmentationClass/train_00000.png")
    assert mask.mode == "P" and set(np.unique(np.array(mask))) <= {0, 1, 2, 3, 255}
    cfg = seg_cfg(shapes, "data=voc", "data.num_classes=4")
    ds = build_seg_dataset(cfg.data, "train", True, 255)
    torch.manual_seed(0)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= {0, 1, 2, 3, 255}
    torch.manual_seed(0)
    assert torch.equal(ds[0][0], x)  # crops are a function of the seeded generator


def _voc_copy(src, dst, n=4):
    import shutil

    shutil.copytree(src, dst)
    (dst / "ImageSets/Segmentation/train.txt").write_text(
        "\n".join(f"train_{i:05d}" for i in range(n)) + "\n"
    )
    return dst


def test_bad_voc_input_names_the_file_or_is_skipped_and_counted(shapes, tmp_path):
    from acon.tasks.segmentation import build_seg_dataset

    root = _voc_copy(shapes, tmp_path / "voc")
    (root / "JPEGImages/train_00001.jpg").unlink()
    Image.new("P", (20, 32)).save(root / "SegmentationClass/train_00002.png")
    data = seg_cfg(root, "data=voc", "data.num_classes=4").data
    with pytest.raises(BadImageError, match=r"train split: missing image file .*/JPEGImages/train_00001.jpg"):
        build_seg_dataset(data, "train", True, 255)
    data.bad_image_policy, data.max_bad_images = "skip", 2
    with pytest.warns(
        UserWarning,
        match=r"skipping 2 of 4 train samples: missing image .*; mask .*train_00002.png is 20x32 but its image",
    ):
        ds = build_seg_dataset(data, "train", True, 255)
    assert len(ds) == 2
    data.max_bad_images = 1
    with pytest.raises(BadImageError, match="2 of 4 samples are bad, more than data.max_bad_images=1"):
        build_seg_dataset(data, "train", True, 255)


def test_labels_outside_the_classes_name_the_mask(shapes, tmp_path):
    from acon.tasks.segmentation import build_seg_dataset

    root = _voc_copy(shapes, tmp_path / "voc")
    bad = np.zeros((32, 32), np.uint8)
    bad[3, 3] = 7
    Image.fromarray(bad).save(root / "SegmentationClass/train_00000.png")
    ds = build_seg_dataset(seg_cfg(root, "data=voc", "data.num_classes=4").data, "train", True, 255)
    with pytest.raises(
        BadImageError, match=r"train_00000.png: labels \[7\] are outside 0..3 and not the ignore"
    ):
        ds[0]


def test_cityscapes_layout_maps_label_ids_to_train_ids(tmp_path):
    from acon.tasks.segmentation import build_seg_dataset

    for split in ("train", "val"):
        img_dir, gt_dir = tmp_path / "leftImg8bit" / split / "aachen", tmp_path / "gtFine" / split / "aachen"
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        Image.new("RGB", (16, 8), (90, 90, 90)).save(img_dir / "aachen_000000_000019_leftImg8bit.png")
        ids = np.full((8, 16), 7, np.uint8)  # road → trainId 0
        ids[:, :4], ids[:, 4:8] = 26, 0  # car → 13, unlabeled → ignore
        Image.fromarray(ids).save(gt_dir / "aachen_000000_000019_gtFine_labelIds.png")
    cfg = compose(["task=segmentation", "data=cityscapes", f"data.root={tmp_path}"])
    _, y = build_seg_dataset(cfg.data, "val", False, 255)[0]
    assert y[0, :4].tolist() == [13] * 4 and y[0, 4:8].tolist() == [255] * 4 and y[0, 8:].tolist() == [0] * 8


def test_segmentation_config_errors_before_any_data():
    from acon.validate import check_train_config

    with pytest.raises(ConfigError, match="task=segmentation needs segmentation data .* not data=digits"):
        check_train_config(compose(["task=segmentation", "data=digits"]), 1)
    with pytest.raises(ConfigError, match="data.root is not set for data=voc"):
        check_train_config(compose(["task=segmentation", "data=voc"]), 1)
    with pytest.raises(ConfigError, match="task=segmentation does not use recipe.mixup=0.2: leave it at"):
        check_train_config(compose(["task=segmentation", "recipe.mixup=0.2"]), 1)
    with pytest.raises(ConfigError, match="backbone.checkpoint='/nope.pt' does not exist"):
        check_train_config(compose(["task=segmentation", "backbone.checkpoint=/nope.pt"]), 1)


@pytest.mark.parametrize(
    ("head", "aux"), [("deeplabv3", True), pytest.param("fcn", False, marks=pytest.mark.slow)]
)
def test_heads_on_dilated_resnet_give_input_size_logits(head, aux):
    from acon.tasks import get_task

    cfg = compose(
        ["task=segmentation", "model=resnet18", f"task.head={head}", f"task.aux_loss={aux}"]
        + ["task.output_stride=8", "data.num_classes=5"]
    )
    model = get_task("segmentation").build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 40))
    assert out["out"].shape == (2, 5, 48, 40) and ("aux" in out) == aux
    assert model.backbone.body.feature_info.reduction() == [8, 8]


def test_segmentation_experiment_cells_compose_with_headers_and_no_paper_number():
    import re

    from conftest import CONFIGS

    files = sorted((CONFIGS / "experiment" / "segmentation").glob("*.yaml"))
    assert len(files) == 16  # {cityscapes, voc} x {resnet50, shufflenetv2_x1_5} x 4 activations
    for f in files:
        head = dict(re.findall(r"^#[ \t]*([A-Z][\w\- ()%]*?):[ \t]*(.*)$", f.read_text(), re.M))
        assert f"experiment=segmentation/{f.stem}" in head["Command"] and "A100" in head["Hardware"]
        assert re.match(r"\d+ \(estimate", head["Expected GPU-hours"]) and head["Paper mIoU (%)"] == ""
        assert head["Expected mIoU (%)"].startswith("unknown")
    for f in (files[0], files[-1]):  # composing takes ~0.7 s each: one per dataset and backbone
        cfg = compose([f"experiment=segmentation/{f.stem}"])
        assert (
            cfg.task.name == "segmentation" and cfg.task.head == "deeplabv3" and cfg.recipe.schedule == "poly"
        )
        assert cfg.data.kind in f.stem and cfg.model.name in f.stem and f.stem.endswith(cfg.activation.name)
        assert cfg.task.output_stride == (
            None if "shufflenet" in f.stem else 8 if "cityscapes" in f.stem else 16
        )


def test_validation_images_of_several_sizes_are_not_padded_together(shapes, tmp_path):
    from acon.tasks.segmentation import build_seg_dataset, val_batch_size

    data = seg_cfg(shapes, "data=voc", "data.num_classes=4").data
    assert val_batch_size(build_seg_dataset(data, "val", False, 255), 8) == 8  # one size: batched
    root = _voc_copy(shapes, tmp_path / "voc")
    for folder, ext, resample in (
        ("JPEGImages", "jpg", Image.BILINEAR),
        ("SegmentationClass", "png", Image.NEAREST),
    ):
        path = root / folder / f"val_00001.{ext}"
        Image.open(path).resize((40, 24), resample).save(path)
    ds = build_seg_dataset(seg_cfg(root, "data=voc", "data.num_classes=4").data, "val", False, 255)
    assert val_batch_size(ds, 8) == 1 and ds[1][0].shape == (3, 24, 40)
