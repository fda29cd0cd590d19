"""The embedded segmentation set: coloured shapes drawn into real JPEG images and VOC palette PNG masks.

Written once (idempotent, atomic) as a Pascal VOC layout under ``~/.cache/acon-suite/seg_shapes`` (or
``$ACON_CACHE``) and read by the same loader as VOC. Classes: 0 background, 1 square, 2 disc,
3 triangle; each class has its own hue range (jittered), on a noisy background, so a small network
learns it in minutes on a CPU. Synthetic: its numbers say nothing about VOC or Cityscapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from acon.data.digits import DEFAULT_CACHE

CLASSES = ("background", "square", "disc", "triangle")
HUES = {1: (220, 60, 60), 2: (60, 200, 80), 3: (70, 90, 230)}  # base colour per class


def voc_palette() -> list[int]:
    """Pascal VOC's 256-colour palette (class c's colour from the bits of c), flattened RGB."""
    pal = []
    for c in range(256):
        r = g = b = 0
        v = c
        for shift in range(7, -1, -1):
            r |= (v & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
        pal += [r, g, b]
    return pal


def draw_sample(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    """One image with 1-3 shapes and its mask (shape borders are the ignore label 255, as in VOC)."""
    base = rng.integers(60, 200, 3)
    pixels = np.clip(base + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    image, mask = Image.fromarray(pixels), Image.new("L", (size, size), 0)
    draw_img, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, 4))
        r = int(rng.integers(size // 8, size // 4))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        colour = tuple(int(v) for v in np.clip(np.array(HUES[cls]) + rng.integers(-30, 31, 3), 0, 255))
        box = [cx - r, cy - r, cx + r, cy + r]
        tri = [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
        for draw, fill, outline in ((draw_img, colour, None), (draw_mask, cls, 255)):
            if cls == 1:
                draw.rectangle(box, fill=fill, outline=outline)
            elif cls == 2:
                draw.ellipse(box, fill=fill, outline=outline)
            else:
                draw.polygon(tri, fill=fill, outline=outline)
    return image, mask


def prepare_seg_shapes(
    root: str | os.PathLike | None = None, train: int = 192, val: int = 48, size: int = 48, seed: int = 0
) -> Path:
    """Write the set as root/{JPEGImages,SegmentationClass,ImageSets/Segmentation}; idempotent."""
    root = Path(root).expanduser() if root else DEFAULT_CACHE / f"seg_shapes_{train}_{val}_{size}_s{seed}"
    if (root / ".complete").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    rng, palette = np.random.default_rng(seed), voc_palette()
    for split, n in (("train", train), ("val", val)):
        ids = [f"{split}_{i:05d}" for i in range(n)]
        for name in ids:
            image, mask = draw_sample(rng, size)
            image.save(tmp / "JPEGImages" / f"{name}.jpg", quality=92)
            mask = Image.frombytes("P", mask.size, mask.tobytes())  # class indices, VOC colours
            mask.putpalette(palette)
            mask.save(tmp / "SegmentationClass" / f"{name}.png")
        (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (tmp / ".complete").touch()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return root
