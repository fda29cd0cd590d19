"""ImageNet-layout folders (root/<class>/<image>) read robustly: by content, not by extension."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from acon.data.bad_images import (
    DECODE_ERRORS,
    BadImageError,
    DecodeError,
    load_or_skip,
    split_batch,
)
from acon.data.index import load_index

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
BAD_IMAGE_POLICIES = ("skip", "raise")
__all__ = ["BAD_IMAGE_POLICIES", "BadImageError", "ImageFolderDataset", "collate_skipping_bad", "open_image"]


def open_image(path: str) -> Image.Image:
    """Open and decode; PIL identifies the format from the bytes, so a PNG named .JPEG still decodes.

    Decoding here (not lazily in the transform) makes a file that cannot be decoded the loader's error,
    and an error in the transform the transform's own.
    """
    if os.path.getsize(path) == 0:
        raise BadImageError(f"{path}: zero-byte image file")
    img = Image.open(path)
    img.load()
    return img


def find_classes(root: Path) -> list[str]:
    """Sorted class folder names under ``root``; a clear error if there are none."""
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(
            f"data folder {str(root)!r} has no class sub-folders (expected root/<class>/<img>)"
        )
    return classes


def scan_samples(root: Path, classes: list[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every image file, plus the names of empty class folders."""
    samples, empty = [], []
    for idx, cls in enumerate(classes):
        found = 0
        for dirpath, _, files in sorted(os.walk(root / cls, followlinks=True)):
            for name in sorted(files):
                if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                    samples.append((os.path.join(dirpath, name), idx))
                    found += 1
        if not found:
            empty.append(cls)
    return samples, empty


class ImageFolderDataset(Dataset):
    """An ImageFolder whose bad images follow a policy: ``raise`` stops with the file's path, ``skip``
    warns with the path and yields None, which ``collate_skipping_bad`` drops and counts."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        loader: Callable[[str], Image.Image] = open_image,
        classes: list[str] | None = None,
        bad_image_policy: str = "raise",
        index_cache: bool = False,
        index_cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if bad_image_policy not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.bad_image_policy={bad_image_policy!r} is not one of {BAD_IMAGE_POLICIES}")
        self.root = Path(root)
        self.classes = classes if classes is not None else find_classes(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        index, self.index_source = load_index(self.root, self.classes, index_cache, index_cache_dir)
        self.samples, self.empty_classes = index.samples(self.root), index.empty
        if not self.samples:
            raise FileNotFoundError(f"data folder {str(self.root)!r} contains no image files")
        self.targets = self.samples.targets
        self.transform, self.loader = transform, loader
        self.bad_image_policy = bad_image_policy
        self.sample_seed: Callable[[int], int] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """Read, decode and transform one sample; a failure to read or decode the file becomes
        BadImageError naming it, any other error propagates as it is."""
        path, target = self.samples[index]
        if self.sample_seed is not None:
            torch.manual_seed(self.sample_seed(index))
        try:
            img = self.loader(path)
        except BadImageError:
            raise
        except DECODE_ERRORS as e:
            raise BadImageError(f"{path}: cannot read or decode image ({type(e).__name__}: {e})") from e
        if not self.transform:
            return img, target
        try:
            return self.transform(img), target
        except DecodeError as e:
            raise BadImageError(f"{path}: cannot decode image ({e})") from e

    def __getitem__(self, index: int):
        return load_or_skip(self.load, index, self.samples[index][0], self.bad_image_policy)


def collate_skipping_bad(batch: list):
    """Default collate over the good samples; returns (images, targets, BadImages: the skipped count and
    files)."""
    good, bad = split_batch(batch, allow_empty=True)
    if not good:  # every image was bad (data.bad_image_policy=skip): the step is skipped on every rank
        return None, None, bad
    images, targets = default_collate(good)
    return images, targets, bad
