"""Class names of the segmentation datasets, for per-class IoU that says which class is which."""

from __future__ import annotations

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
"""The 19 training ids of cityscapesscripts' labels.py, in trainId order."""


def class_names(kind: str, num_classes: int) -> list[str]:
    """The names of ``num_classes`` classes of a ``data.kind`` (``class_<i>`` where none are known)."""
    from acon.data.seg_shapes import CLASSES as SHAPES

    known = {"voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "seg_shapes": SHAPES}.get(kind, ())
    if len(known) == num_classes:
        return list(known)
    return [f"class_{i}" for i in range(num_classes)]
