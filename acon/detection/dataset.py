"""COCO-format detection samples as torchvision's detectors take them, and their batches."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_area
from torchvision.transforms.functional import pil_to_tensor
from torchvision.transforms.v2 import functional as TF

from acon.data.bad_images import DECODE_ERRORS, BadImageError, load_or_skip, split_batch
from acon.data.folder import BAD_IMAGE_POLICIES, open_image
from acon.detection.coco import CocoIndex
from acon.errors import ConfigError


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror an image (C, H, W) and its xyxy boxes left-right (``transforms.v2`` on ``tv_tensors``)."""
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
    image, boxes = TF.horizontal_flip(image), TF.horizontal_flip(boxes)
    return image, {**target, "boxes": boxes.as_subclass(torch.Tensor)}


class CocoDetectionDataset(Dataset):
    """Images of a COCO instances file as (float CHW image in [0, 1], target), torchvision's format.

    The target has ``boxes`` (float32 N×4, xyxy pixels), ``labels`` (int64, contiguous 1..K),
    ``image_id`` (the COCO id), ``area`` and ``iscrowd``. ``train=True`` mirrors with probability
    ``hflip_prob`` (drawn from torch's RNG, so a seeded sample is reproducible). ``bgr=True`` gives the
    channels in BGR order (``data.preprocess=bgr_255``; the detector scales to 0-255). Files that cannot be
    decoded follow ``bad_image_policy`` as for classification (``raise``: the path in the error;
    ``skip``: a warning, and the batch counts it).
    """

    def __init__(
        self,
        index: CocoIndex,
        train: bool = False,
        hflip_prob: float = 0.5,
        bad_image_policy: str = "raise",
        bgr: bool = False,
    ) -> None:
        if bad_image_policy not in BAD_IMAGE_POLICIES:
            raise ConfigError(
                f"data.bad_image_policy={bad_image_policy!r} is not one of {BAD_IMAGE_POLICIES}"
            )
        self.index, self.train, self.hflip_prob = index, train, float(hflip_prob)
        self.bad_image_policy, self.bgr = bad_image_policy, bgr

    def __len__(self) -> int:
        return len(self.index.records)

    def target(self, i: int) -> dict:
        """The training target of sample ``i`` (no image decoded)."""
        rec = self.index.records[i]
        boxes = torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": boxes,
            "labels": torch.tensor(rec.labels, dtype=torch.int64),
            "image_id": rec.image_id,
            "area": box_area(boxes),
            "iscrowd": torch.zeros(len(rec.labels), dtype=torch.int64),
        }

    def load(self, i: int) -> tuple[torch.Tensor, dict]:
        """Decode image ``i`` (BadImageError naming the file on failure) and build its target."""
        rec = self.index.records[i]
        try:
            img = open_image(rec.path).convert("RGB")
        except BadImageError:
            raise
        except DECODE_ERRORS as e:
            raise BadImageError(f"{rec.path}: cannot read or decode image ({type(e).__name__}: {e})") from e
        if img.size != (rec.width, rec.height):
            raise ConfigError(
                f"{rec.path}: image is {img.size[0]}x{img.size[1]} but {self.index.ann_file} says "
                f"{rec.width}x{rec.height} (image id {rec.image_id})"
            )
        image, target = pil_to_tensor(img).float().div_(255), self.target(i)
        if self.bgr:
            image = image.flip(0)
        if self.train and self.hflip_prob > 0 and torch.rand(()).item() < self.hflip_prob:
            image, target = hflip(image, target)
        return image, target

    def __getitem__(self, i: int):
        return load_or_skip(self.load, i, self.index.records[i].path, self.bad_image_policy)


def collate_detection(batch: list) -> tuple[list[torch.Tensor] | None, list[dict] | None, object]:
    """(list of images, list of targets, BadImages: the skipped count and files) for one batch; (None,
    None, BadImages) when every image of the batch was skipped."""
    good, bad = split_batch(batch, allow_empty=True)
    if not good:
        return None, None, bad
    return [g[0] for g in good], [g[1] for g in good], bad


def split_paths(root: str | os.PathLike, split: str, ann_pattern: str, images_pattern: str) -> tuple:
    """(instances JSON, image folder) of ``split`` under ``root`` (COCO 2017 layout by default)."""
    root = os.path.expanduser(str(root))
    ann = os.path.join(root, ann_pattern.format(split=split))
    images = os.path.join(root, images_pattern.format(split=split))
    if not os.path.isdir(images):
        raise FileNotFoundError(f"data.root={root!r}: missing image folder {images!r} for split {split!r}")
    return ann, images


def split_index(data_cfg, split: str, train: bool) -> CocoIndex:
    """The checked index of ``split`` for ``data_cfg`` (``data=coco`` or the embedded ``det_shapes``).

    Training follows ``data.empty_policy``; validation keeps every image (COCOeval scores them all)."""
    if data_cfg.kind == "det_shapes":
        from acon.detection.shapes import prepare_shapes

        root = prepare_shapes(
            data_cfg.root,
            int(data_cfg.train_samples),
            int(data_cfg.val_samples),
            int(data_cfg.shapes_size),
            int(data_cfg.max_shapes),
        )
    elif not data_cfg.root:
        raise ConfigError(f"data.root is not set for data={data_cfg.name}; pass data.root=/path/to/coco")
    else:
        root = data_cfg.root
    ann, images = split_paths(root, split, str(data_cfg.ann_file), str(data_cfg.images_dir))
    policy = str(data_cfg.empty_policy) if train else "keep"
    index = CocoIndex(ann, images, box_policy=str(data_cfg.box_policy), empty_policy=policy)
    if len(index.labels) != int(data_cfg.num_classes):
        raise ConfigError(
            f"{ann} has {len(index.labels)} categories but data.num_classes={data_cfg.num_classes}"
        )
    return index


def build_split(data_cfg, split: str, train: bool) -> CocoDetectionDataset:
    """The dataset of ``split`` (training: mirrored with ``data.hflip_prob``; BGR under ``bgr_255``)."""
    index = split_index(data_cfg, split, train)
    hflip_prob = float(data_cfg.hflip_prob) if train else 0.0
    bgr = str(data_cfg.get("preprocess", "rgb_normalized")) == "bgr_255"
    return CocoDetectionDataset(index, train, hflip_prob, str(data_cfg.bad_image_policy), bgr)


def index_of(loader_or_dataset) -> CocoIndex:
    """The ``CocoIndex`` behind a detection loader or dataset (through the loader and any wrapper)."""
    ds = getattr(loader_or_dataset, "dataset", loader_or_dataset)
    while not isinstance(ds, CocoDetectionDataset) and hasattr(ds, "dataset"):
        ds = ds.dataset
    if not isinstance(ds, CocoDetectionDataset):
        raise TypeError(f"{type(loader_or_dataset).__name__} does not read a COCO-format dataset")
    return ds.index


def image_sizes(dataset: CocoDetectionDataset) -> set[tuple[int, int]]:
    """The distinct (width, height) of the images, from the annotations."""
    return {(r.width, r.height) for r in dataset.index.records}
