"""COCO instances files read and checked before any image is decoded.

Every problem the annotations can have is found while the JSON is indexed, so a bad file stops the run
in one ``error:`` line (naming the file, the image or annotation id) before a model is built. What is
kept, clipped or dropped follows two documented policies and is counted in :class:`CocoStats`:

- ``box_policy="clip"`` (default): a box reaching outside its image is clipped to it (counted); a box
  left with no area (zero or negative width/height, entirely outside the image) is dropped (counted).
  ``box_policy="raise"``: either is an error naming the annotation id and the image file.
- ``empty_policy="skip"`` (training default): images without a usable box are left out (counted);
  ``"keep"`` (always for validation, where COCOeval scores every image) keeps them with no targets.
- ``iscrowd=1`` regions are not training targets (counted); COCOeval treats them as "ignore" regions.

Always errors: a missing or unreadable JSON, missing ``images``/``annotations``/``categories``, an
annotation whose ``category_id`` is not among ``categories`` or whose ``image_id`` is not among
``images``, a box that is not four finite numbers, an image without a positive ``width``/``height``,
a missing or repeated annotation id, and image files that do not exist (the first few are named, with the count).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from acon.errors import ConfigError

BOX_POLICIES = ("clip", "raise")
EMPTY_POLICIES = ("skip", "keep")


@dataclass
class CocoStats:
    """What indexing kept, changed or dropped (reported in the run's log and results.json)."""

    images: int = 0
    boxes: int = 0
    empty_images_skipped: int = 0
    empty_images_kept: int = 0
    boxes_clipped: int = 0
    degenerate_boxes_dropped: int = 0
    crowd_regions_ignored: int = 0

    def summary(self) -> str:
        """One line for the log."""
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in asdict(self).items())


@dataclass
class CocoRecord:
    """One image: its file, size and training boxes (xyxy, pixels) with contiguous labels (1..K)."""

    image_id: int
    path: str
    width: int
    height: int
    boxes: list = field(default_factory=list)
    labels: list = field(default_factory=list)


def load_instances(ann_file: str | os.PathLike) -> dict:
    """The parsed instances JSON, with its top-level keys checked."""
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a valid JSON file ({e})") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ConfigError(f"{path}: not a COCO instances file: no list {missing} at the top level")
    return data


def category_labels(data: dict, ann_file: str | os.PathLike) -> dict[int, int]:
    """COCO category id -> contiguous label 1..K in increasing id order (0 is the background)."""
    ids = [c.get("id") for c in data["categories"]]
    if not ids or any(not isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"{ann_file}: categories need unique integer ids, got {ids[:10]}")
    return {cid: label for label, cid in enumerate(sorted(ids), start=1)}


def _check_box(ann: dict, where: str) -> list[float]:
    box = ann.get("bbox")
    ok = isinstance(box, list) and len(box) == 4
    if not ok or not all(isinstance(v, int | float) and math.isfinite(v) for v in box):
        raise ConfigError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {box!r}")
    return [float(v) for v in box]


def clip_boxes(xywh: list[list[float]], sizes: list[tuple[int, int]]) -> tuple[list, list[bool], list[bool]]:
    """Each xywh box as xyxy clipped to its image ((width, height) in ``sizes``), with torchvision.ops in
    one pass: (clipped boxes, whether clipping changed each, whether each is left with no area)."""
    import torch
    from torchvision.ops import box_convert, remove_small_boxes

    if not xywh:
        return [], [], []
    raw = box_convert(torch.tensor(xywh, dtype=torch.float64), "xywh", "xyxy")
    size = torch.tensor([[w, h, w, h] for w, h in sizes], dtype=torch.float64)
    out = raw.clamp(min=0).minimum(size)  # clip_boxes_to_image takes one image size; here one per box
    kept = torch.zeros(len(out), dtype=torch.bool)
    kept[remove_small_boxes(out, torch.finfo(torch.float64).tiny)] = True
    return out.tolist(), (out != raw).any(1).tolist(), (~kept).tolist()


class CocoIndex:
    """The checked records of one split: ``records`` (training targets), ``labels`` (id -> label)."""

    def __init__(
        self,
        ann_file: str | os.PathLike,
        images_dir: str | os.PathLike,
        box_policy: str = "clip",
        empty_policy: str = "keep",
    ) -> None:
        if box_policy not in BOX_POLICIES:
            raise ConfigError(f"data.box_policy={box_policy!r} is not one of {BOX_POLICIES}")
        if empty_policy not in EMPTY_POLICIES:
            raise ConfigError(f"data.empty_policy={empty_policy!r} is not one of {EMPTY_POLICIES}")
        self.ann_file, self.images_dir = Path(ann_file), Path(images_dir)
        self.data = load_instances(self.ann_file)
        self.labels = category_labels(self.data, self.ann_file)
        self.label_to_category = {v: k for k, v in self.labels.items()}
        self.category_names = {c["id"]: str(c.get("name", c["id"])) for c in self.data["categories"]}
        self.box_policy, self.stats = box_policy, CocoStats()
        records = self._image_records()
        self._add_annotations(records)
        self._check_files(records)
        self.records = self._apply_empty_policy(list(records.values()), empty_policy)
        self.stats.images = len(self.records)

    @property
    def num_classes(self) -> int:
        """Categories plus the background (torchvision's convention)."""
        return len(self.labels) + 1

    def _image_records(self) -> dict[int, CocoRecord]:
        records = {}
        for img in self.data["images"]:
            iid, name = img.get("id"), img.get("file_name")
            w, h = img.get("width"), img.get("height")
            if not isinstance(iid, int) or not isinstance(name, str):
                raise ConfigError(f"{self.ann_file}: image entry without integer id and file_name: {img}")
            if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
                raise ConfigError(f"{self.ann_file}: image id {iid} ({name}) needs positive width/height")
            if iid in records:
                raise ConfigError(f"{self.ann_file}: image id {iid} appears twice")
            records[iid] = CocoRecord(iid, str(self.images_dir / name), w, h)
        return records

    def _add_annotations(self, records: dict[int, CocoRecord]) -> None:
        seen: set = set()
        found: list[tuple[CocoRecord, list[float], int, str]] = []
        for ann in self.data["annotations"]:
            aid = ann.get("id")
            where = f"{self.ann_file}: annotation id {aid}"
            if not isinstance(aid, int) or aid in seen:
                raise ConfigError(f"{where}: annotation ids must be unique integers (COCOeval matches by id)")
            seen.add(aid)
            rec = records.get(ann.get("image_id"))
            if rec is None:
                raise ConfigError(f"{where}: image_id {ann.get('image_id')!r} is not among the images")
            if ann.get("category_id") not in self.labels:
                raise ConfigError(
                    f"{where} (image {rec.path}): category_id {ann.get('category_id')!r} is not among the "
                    f"categories {sorted(self.labels)[:20]}"
                )
            box = _check_box(ann, f"{where} (image {rec.path})")
            if ann.get("iscrowd", 0):
                self.stats.crowd_regions_ignored += 1
                continue
            found.append((rec, box, self.labels[ann["category_id"]], f"{where} (image {rec.path})"))
        boxes = clip_boxes([f[1] for f in found], [(f[0].width, f[0].height) for f in found])
        for (rec, xywh, label, where), xyxy, clipped, degenerate in zip(found, *boxes, strict=True):
            self._add_box(rec, xywh, label, where, xyxy, clipped, degenerate)

    def _add_box(
        self,
        rec: CocoRecord,
        xywh: list[float],
        label: int,
        where: str,
        xyxy,
        clipped: bool,
        degenerate: bool,
    ) -> None:
        if self.box_policy == "raise" and (clipped or degenerate):
            what = "has no area" if degenerate else f"reaches outside the {rec.width}x{rec.height} image"
            raise ConfigError(f"{where}: bbox {xywh} {what} (data.box_policy=raise; clip drops or clips it)")
        if degenerate:
            self.stats.degenerate_boxes_dropped += 1
            return
        self.stats.boxes_clipped += int(clipped)
        self.stats.boxes += 1
        rec.boxes.append(xyxy)
        rec.labels.append(label)

    def _check_files(self, records: dict[int, CocoRecord]) -> None:
        missing = [r.path for r in records.values() if not os.path.isfile(r.path)]
        if missing:
            first = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} of {len(records)} image files listed in {self.ann_file} are missing: {first}"
            )

    def _apply_empty_policy(self, records: list[CocoRecord], policy: str) -> list[CocoRecord]:
        empty = sum(1 for r in records if not r.boxes)
        if policy == "keep":
            self.stats.empty_images_kept = empty
            return records
        self.stats.empty_images_skipped = empty
        kept = [r for r in records if r.boxes]
        if not kept:
            raise ConfigError(f"{self.ann_file}: no image has a usable box (data.empty_policy=skip)")
        return kept
