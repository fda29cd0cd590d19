"""The embedded detection set: coloured shapes on noise, written once as a real COCO dataset.

``prepare_shapes(root)`` draws squares, discs and triangles (one category each) and writes
``root/{train,val}/*`` (training images as JPEG, validation as PNG) with
``root/annotations/instances_{train,val}.json``: COCO boxes, polygon masks (the very polygons drawn),
areas and ``iscrowd=0``. It is read by the same reader as COCO, so it checks the whole path on a CPU.
Everything is a function of the seed; the folder is written to a temporary name and renamed when
complete, so concurrent first uses (DDP ranks, parallel tests) are safe.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from acon.data.digits import DEFAULT_CACHE

CATEGORIES = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 2, "name": "disc", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
VERSION = 2  # bump when the drawing changes: the cache folder name carries it


def shape_polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The outline of a shape of category ``kind`` centred at (cx, cy) with radius ``r``."""
    if kind == 1:  # axis-aligned square
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    n = 24 if kind == 2 else 3
    start = 0.0 if kind == 2 else angle
    return [
        (cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
        for k in range(n)
    ]


def polygon_area(points: list[tuple[float, float]]) -> float:
    """The shoelace area of a simple polygon."""
    s = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True))
    return abs(s) / 2


def _place(rng: np.random.Generator, size: int, taken: list, r_range: tuple[float, float]):
    """A centre and radius that keep the shape inside the image and apart from the others (or None)."""
    for _ in range(20):
        r = rng.uniform(*r_range)
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in taken):
            return float(cx), float(cy), float(r)
    return None


def draw_image(rng: np.random.Generator, size: int, max_shapes: int) -> tuple[Image.Image, list[dict]]:
    """One noisy image and its shapes as (category_id, polygon) dicts."""
    noise = rng.normal(110, 25, (size, size, 3)) + np.linspace(-20, 20, size)[None, :, None]
    img = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    draw, taken, shapes = ImageDraw.Draw(img), [], []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        spot = _place(rng, size, taken, (size * 0.1, size * 0.25))
        if spot is None:
            continue
        kind = int(rng.integers(1, len(CATEGORIES) + 1))
        poly = shape_polygon(kind, *spot, angle=float(rng.uniform(0, 2 * math.pi)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.polygon(poly, fill=colour)
        taken.append(spot)
        shapes.append({"category_id": kind, "polygon": poly})
    return img, shapes


def annotation(ann_id: int, image_id: int, shape: dict) -> dict:
    """The COCO annotation of one drawn shape: xywh box, polygon mask, area."""
    poly = shape["polygon"]
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": shape["category_id"],
        "bbox": [round(v, 2) for v in box],
        "segmentation": [[round(v, 2) for p in poly for v in p]],
        "area": round(polygon_area(poly), 2),
        "iscrowd": 0,
    }


def write_split(root: Path, split: str, count: int, size: int, max_shapes: int, seed: int) -> None:
    """``count`` images of ``split`` and its instances JSON under ``root``."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    ext = "jpg" if split == "train" else "png"
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(count):
        img, shapes = draw_image(rng, size, max_shapes)
        name = f"{split}_{i:05d}.{ext}"
        img.save(root / split / name, **({"quality": 95} if ext == "jpg" else {}))
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        anns += [annotation(len(anns) + k + 1, i + 1, s) for k, s in enumerate(shapes)]
    (root / "annotations").mkdir(exist_ok=True)
    doc = {
        "info": {"description": f"acon-suite synthetic shapes v{VERSION}, seed {seed}"},
        "images": images,
        "annotations": anns,
        "categories": CATEGORIES,
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def prepare_shapes(
    root: str | os.PathLike | None = None,
    train_images: int = 512,
    val_images: int = 128,
    size: int = 64,
    max_shapes: int = 3,
    seed: int = 0,
) -> Path:
    """Write the set under ``root`` (default: the cache, one folder per setting); idempotent."""
    tag = f"shapes-v{VERSION}-{train_images}-{val_images}-{size}px-{max_shapes}-s{seed}"
    root = Path(root) if root else DEFAULT_CACHE / tag
    if (root / ".complete").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_split(tmp, "train", train_images, size, max_shapes, seed)
    write_split(tmp, "val", val_images, size, max_shapes, seed)
    (tmp / ".complete").touch()
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
