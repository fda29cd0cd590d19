"""ImageNet-layout folders (root/<class>/<image>) read robustly: by content, not by extension."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from acon.data.index import load_index

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
BAD_IMAGE_POLICIES = ("skip", "raise")


class BadImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file."""


def open_image(path: str) -> Image.Image:
    """Open lazily; PIL identifies the format from the bytes, so a PNG named .JPEG still decodes."""
    if os.path.getsize(path) == 0:
        raise BadImageError(f"{path}: zero-byte image file")
    return Image.open(path)


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
        """Decode and transform one sample; errors become BadImageError naming the file."""
        path, target = self.samples[index]
        if self.sample_seed is not None:
            torch.manual_seed(self.sample_seed(index))
        try:
            img = self.loader(path)
            return (self.transform(img) if self.transform else img), target
        except BadImageError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise BadImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e

    def __getitem__(self, index: int):
        try:
            return self.load(index)
        except BadImageError as e:
            if self.bad_image_policy == "raise":
                raise
            warnings.warn(f"skipping bad image: {e}", stacklevel=2)
            return None


def collate_skipping_bad(batch: list):
    """Default collate over the good samples; returns (images, targets, number of bad images skipped)."""
    good = [b for b in batch if b is not None]
    if not good:
        raise BadImageError(f"every image in a batch of {len(batch)} failed to decode")
    images, targets = default_collate(good)
    return images, targets, len(batch) - len(good)
