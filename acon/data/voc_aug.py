"""DeepLabV3's ``train_aug`` split of Pascal VOC 2012: VOC's segmentation masks plus SBD's (Hariharan et
al. 2011), in the VOC layout the segmentation loader reads.

``prepare_voc_aug(voc_root, sbd_root)`` writes ``voc_root/SegmentationClassAug/<id>.png`` (class indices,
255 = border/ignore) for every image of the list and ``voc_root/ImageSets/Segmentation/train_aug.txt``:
(SBD train ∪ SBD val ∪ VOC train) minus VOC val, 10,582 ids on the official releases. An image annotated
by VOC keeps VOC's mask (with its 255 borders); the others take SBD's ``cls/<id>.mat`` ``GTcls``
segmentation. VOC val stays out, so ``val`` remains a held-out set.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from acon.errors import ConfigError

AUG_MASK_DIR = "SegmentationClassAug"
AUG_SPLIT = "train_aug"


def _ids(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"missing list file {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_sbd_mask(mat_file: Path) -> np.ndarray:
    """The class-index mask (uint8, HxW) of one SBD ``cls/<id>.mat`` file."""
    from scipy.io import loadmat

    gt = loadmat(str(mat_file), squeeze_me=True, struct_as_record=False)["GTcls"]
    return np.asarray(gt.Segmentation, dtype=np.uint8)


def train_aug_ids(voc_root: Path, sbd_root: Path) -> list[str]:
    """(SBD train ∪ SBD val ∪ VOC train) minus VOC val, sorted."""
    lists = voc_root / "ImageSets" / "Segmentation"
    sbd = set(_ids(sbd_root / "train.txt")) | set(_ids(sbd_root / "val.txt"))
    return sorted((sbd | set(_ids(lists / "train.txt"))) - set(_ids(lists / "val.txt")))


def prepare_voc_aug(voc_root: str | Path, sbd_root: str | Path) -> tuple[Path, int]:
    """Write the train_aug masks and list under ``voc_root`` (VOC2012 folder) from ``sbd_root`` (SBD's
    ``benchmark_RELEASE/dataset`` folder, holding ``cls/`` and ``train.txt``/``val.txt``); returns (the list
    file, the number of ids). Every listed image must exist in ``JPEGImages/``."""
    voc_root, sbd_root = Path(voc_root).expanduser(), Path(sbd_root).expanduser()
    ids = train_aug_ids(voc_root, sbd_root)
    out = voc_root / AUG_MASK_DIR
    out.mkdir(exist_ok=True)
    missing = [i for i in ids if not (voc_root / "JPEGImages" / f"{i}.jpg").is_file()]
    if missing:
        raise ConfigError(
            f"{len(missing)} train_aug images are not in {voc_root / 'JPEGImages'}: {missing[:5]}"
        )
    for i in ids:
        voc_mask = voc_root / "SegmentationClass" / f"{i}.png"
        if voc_mask.is_file():
            shutil.copyfile(voc_mask, out / f"{i}.png")
            continue
        mat = sbd_root / "cls" / f"{i}.mat"
        if not mat.is_file():
            raise ConfigError(f"no mask for {i}: neither {voc_mask} nor {mat} exists")
        Image.fromarray(read_sbd_mask(mat), mode="L").save(out / f"{i}.png")
    listing = voc_root / "ImageSets" / "Segmentation" / f"{AUG_SPLIT}.txt"
    listing.write_text("".join(f"{i}\n" for i in ids))
    return listing, len(ids)
