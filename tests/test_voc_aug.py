"""VOC's train_aug split: SBD's masks written in VOC layout with the list, read by the VOC experiments."""

from __future__ import annotations

import shutil
import sys

import numpy as np
from conftest import compose, run_cli
from PIL import Image

from acon.data.seg_shapes import prepare_seg_shapes


def fake_sbd(voc, sbd) -> dict[str, np.ndarray]:
    """SBD's layout (cls/<id>.mat with GTcls.Segmentation, train.txt, val.txt) for two extra images; one
    VOC train and one VOC val id are listed too, as in the real release."""
    from scipy.io import savemat

    (sbd / "cls").mkdir(parents=True)
    masks = {}
    for k, name in enumerate(("sbd_0000", "sbd_0001")):
        shutil.copyfile(voc / "JPEGImages" / "train_00000.jpg", voc / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((32, 32), np.uint8)
        mask[4:12, 4:20] = k + 1
        savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": mask, "CategoriesPresent": [k + 1]}})
        masks[name] = mask
    (sbd / "train.txt").write_text("sbd_0000\ntrain_00000\n")
    (sbd / "val.txt").write_text("sbd_0001\nval_00000\n")
    return masks


def test_train_aug_list_and_masks_are_read_by_the_voc_experiments(tmp_path):
    from acon.tasks.segmentation import build_seg_dataset

    voc = prepare_seg_shapes(tmp_path / "voc", train=6, val=3, size=32)
    masks = fake_sbd(voc, tmp_path / "sbd")
    proc = run_cli(
        [sys.executable, "scripts/prepare_voc_aug.py", "--voc", str(voc), "--sbd", str(tmp_path / "sbd")]
    )
    assert "wrote 8 masks" in proc.stdout and "train_aug.txt" in proc.stdout
    ids = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert ids == sorted(["sbd_0000", "sbd_0001", *(f"train_{i:05d}" for i in range(6))])  # VOC val left out
    aug = voc / "SegmentationClassAug"
    assert np.array_equal(np.array(Image.open(aug / "sbd_0001.png")), masks["sbd_0001"])
    voc_mask = np.array(Image.open(voc / "SegmentationClass" / "train_00000.png"))
    assert np.array_equal(np.array(Image.open(aug / "train_00000.png")), voc_mask)  # VOC's own mask kept

    cfg = compose(["experiment=segmentation/deeplabv3_voc_resnet50_relu", f"data.root={voc}"])
    assert (cfg.data.train_split, cfg.data.train_mask_dir) == ("train_aug", "SegmentationClassAug")
    train = build_seg_dataset(cfg.data, "train_aug", True, 255)
    val = build_seg_dataset(cfg.data, "val", False, 255)
    assert len(train) == 8 and train.pairs[0][1] == str(aug / "sbd_0000.png")
    assert len(val) == 3 and "/SegmentationClass/" in val.pairs[0][1]


def test_missing_sbd_list_is_an_error_naming_it(tmp_path):
    import pytest

    from acon.data.voc_aug import prepare_voc_aug
    from acon.errors import ConfigError

    voc = prepare_seg_shapes(tmp_path / "voc", train=2, val=1, size=32)
    with pytest.raises(ConfigError, match=f"missing list file {tmp_path / 'nope' / 'train.txt'}"):
        prepare_voc_aug(voc, tmp_path / "nope")
