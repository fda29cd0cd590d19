"""Semantic segmentation data: Pascal VOC and Cityscapes layouts, joint image/mask transforms, padding collate.

- VOC: ``root/JPEGImages/<id>.jpg``, ``root/SegmentationClass/<id>.png`` (palette PNG, 255 = ignore) and
  ``root/ImageSets/Segmentation/<split>.txt`` (one id a line). DeepLabV3's ``train_aug`` (10,582 images with
  SBD's extra masks): ``ImageSets/Segmentation/train_aug.txt`` with the masks in ``SegmentationClassAug/``,
  written from SBD's release by ``scripts/prepare_voc_aug.py`` (``acon.data.voc_aug``).
- Cityscapes: ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
  ``root/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png``, or ``..._labelIds.png`` mapped id → trainId.

Every listed pair is checked before training (both files exist, the mask has the image's size, read from
the headers); labels outside ``[0, num_classes)`` other than the ignore label are checked when a mask is
read. ``data.bad_image_policy=raise`` stops with the file's name; ``skip`` drops the sample, warns with the
file and counts it (the scan's skips against ``data.max_bad_images``, read failures as for classification).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from acon.data.bad_images import DECODE_ERRORS, BadImageError, SkippedImage, default_budget, split_batch
from acon.data.folder import open_image
from acon.errors import ConfigError

Pair = tuple[str, str]  # (image file, mask file)


def voc_pairs(root: Path, split: str, mask_dir: str = "SegmentationClass") -> list[Pair]:
    """The (image, mask) files listed in ``ImageSets/Segmentation/<split>.txt``, masks in ``mask_dir``."""
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise ConfigError(f"data.root={str(root)!r} is not a VOC layout: missing {listing}")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise ConfigError(f"{listing} lists no images")
    return [(str(root / "JPEGImages" / f"{i}.jpg"), str(root / mask_dir / f"{i}.png")) for i in ids]


def cityscapes_pairs(root: Path, split: str) -> list[Pair]:
    """(leftImg8bit image, gtFine mask) pairs of ``split``: labelTrainIds masks, else labelIds ones."""
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise ConfigError(f"data.root={str(root)!r} has no leftImg8bit/{split}/<city>/*_leftImg8bit.png")
    pairs = []
    for img in images:
        stem = img.name.removesuffix("_leftImg8bit.png")
        folder = root / "gtFine" / split / img.parent.name
        train_ids = folder / f"{stem}_gtFine_labelTrainIds.png"
        pairs.append(
            (str(img), str(train_ids if train_ids.is_file() else folder / f"{stem}_gtFine_labelIds.png"))
        )
    return pairs


def cityscapes_label_map(ignore_index: int = 255) -> np.ndarray:
    """Lookup table id → trainId (torchvision's Cityscapes class list; unlabelled ids → ignore)."""
    from torchvision.datasets import Cityscapes

    lut = np.full(256, ignore_index, dtype=np.uint8)
    for c in Cityscapes.classes:
        if 0 <= c.id < 256 and c.train_id not in (-1, 255):
            lut[c.id] = c.train_id
    return lut


def _problem(pair: Pair) -> str | None:
    image, mask = pair
    for path, what in ((image, "image"), (mask, "mask")):
        if not Path(path).is_file():
            return f"missing {what} file {path}"
    try:
        with Image.open(image) as a, Image.open(mask) as b:
            if a.size != b.size:
                return (
                    f"mask {mask} is {b.size[0]}x{b.size[1]} but its image {image} is {a.size[0]}x{a.size[1]}"
                )
    except DECODE_ERRORS as e:
        return f"cannot read {image} or {mask} ({type(e).__name__}: {e})"
    return None


def check_pairs(
    pairs: list[Pair], split: str, policy: str, max_bad: int | None
) -> tuple[list[Pair], list[str]]:
    """The usable pairs and the problems found (raise on the first under policy ``raise``, or past the
    ``max_bad`` budget under ``skip``); reads image headers only."""
    good, problems = [], []
    for pair in pairs:
        problem = _problem(pair)
        if problem is None:
            good.append(pair)
            continue
        if policy == "raise":
            raise BadImageError(f"{split} split: {problem} (data.bad_image_policy=skip drops such samples)")
        problems.append(problem)
    if problems:
        budget = default_budget(len(pairs)) if max_bad is None else int(max_bad)
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        if len(problems) > budget:
            raise BadImageError(
                f"{split} split: {len(problems)} of {len(pairs)} samples are bad, more than "
                f"data.max_bad_images={budget}: {shown}"
            )
        warnings.warn(f"skipping {len(problems)} of {len(pairs)} {split} samples: {shown}", stacklevel=2)
    return good, problems


def image_sizes(pairs: Sequence[Pair]) -> set[tuple[int, int]]:
    """The distinct (width, height) of the images (headers only)."""
    sizes = set()
    for image, _ in pairs:
        with Image.open(image) as im:
            sizes.add(im.size)
    return sizes


class SegmentationDataset(Dataset):
    """(image tensor, mask tensor) pairs; ``transform(image, mask)`` gets PIL images and returns tensors."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        transform,
        num_classes: int,
        ignore_index: int = 255,
        label_map: np.ndarray | None = None,
        bad_image_policy: str = "raise",
    ) -> None:
        self.pairs, self.transform = list(pairs), transform
        self.num_classes, self.ignore_index, self.label_map = num_classes, ignore_index, label_map
        self.bad_image_policy = bad_image_policy
        self.scan_skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def read_mask(self, path: str) -> Image.Image:
        """The mask as class indices (mode L), mapped by ``label_map``; labels out of range are an error."""
        with Image.open(path) as m:
            labels = np.array(m if m.mode in ("P", "L") else m.convert("L"), dtype=np.uint8)
        if self.label_map is not None:
            labels = self.label_map[labels]
        bad = np.unique(labels[(labels >= self.num_classes) & (labels != self.ignore_index)])
        if bad.size:
            raise BadImageError(
                f"{path}: labels {bad[:10].tolist()} are outside 0..{self.num_classes - 1} and not the ignore "
                f"label {self.ignore_index} (data.num_classes={self.num_classes})"
            )
        return Image.fromarray(labels, mode="L")

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index]
        try:
            try:
                image, mask = open_image(image_path), self.read_mask(mask_path)
            except BadImageError:
                raise
            except DECODE_ERRORS as e:
                raise BadImageError(
                    f"{image_path}: cannot read image or mask ({type(e).__name__}: {e})"
                ) from e
            return self.transform(image, mask)
        except BadImageError as e:
            if self.bad_image_policy == "raise":
                raise
            warnings.warn(f"skipping bad sample: {e}", stacklevel=2)
            return SkippedImage(image_path, str(e))


class PadCollate:
    """Stack (image, mask) pairs padded to the batch's largest size (image 0, mask the ignore label);
    returns (images, masks, BadImages), or (None, None, BadImages) when every sample was skipped."""

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index = ignore_index

    def __call__(self, batch: list):
        good, bad = split_batch(batch, allow_empty=True)
        if not good:
            return None, None, bad
        h = max(img.shape[-2] for img, _ in good)
        w = max(img.shape[-1] for img, _ in good)
        images = torch.zeros(len(good), good[0][0].shape[0], h, w, dtype=good[0][0].dtype)
        masks = torch.full((len(good), h, w), self.ignore_index, dtype=torch.long)
        for i, (img, mask) in enumerate(good):
            images[i, :, : img.shape[-2], : img.shape[-1]] = img
            masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
        return images, masks, bad
