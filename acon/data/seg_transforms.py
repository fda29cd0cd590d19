"""Joint image/mask transforms for segmentation: random scale, pad, crop and flip; normalisation.

Random draws come from torch's CPU generator, which the resumable train sampler seeds per sample, so the
crops of a sample depend on (seed, epoch, index) only: worker counts and resumption do not change them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from acon.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def to_tensors(image: Image.Image, mask: Image.Image, preprocess: str, mean, std) -> tuple:
    """(normalised float CHW image, long HW mask). ``bgr_255``: the authors' BGR 0-255 input."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)
    if preprocess == "bgr_255":
        x = x.flip(0)
    else:
        x = (x / 255.0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x, torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())


class SegTrainTransform:
    """Scale by a factor drawn from ``scale_range``, pad to ``crop_size`` (mask: the ignore label), take a
    random ``crop_size`` square and flip horizontally with probability 0.5 when ``hflip``."""

    def __init__(
        self,
        crop_size: int,
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: bool = True,
        ignore_index: int = 255,
        preprocess: str = "rgb_normalized",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.crop, self.scale_range, self.hflip = int(crop_size), tuple(scale_range), hflip
        self.ignore_index, self.preprocess, self.mean, self.std = ignore_index, preprocess, mean, std

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.scale_range
        s = lo + (hi - lo) * torch.rand(()).item()
        w, h = max(1, round(image.width * s)), max(1, round(image.height * s))
        image, mask = image.resize((w, h), Image.BILINEAR), mask.resize((w, h), Image.NEAREST)
        x, y = to_tensors(image, mask, self.preprocess, self.mean, self.std)
        ph, pw = max(self.crop - h, 0), max(self.crop - w, 0)
        if ph or pw:
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=0.0)
            y = torch.nn.functional.pad(y, (0, pw, 0, ph), value=self.ignore_index)
        top = int(torch.randint(y.shape[0] - self.crop + 1, ()).item())
        left = int(torch.randint(y.shape[1] - self.crop + 1, ()).item())
        x, y = (
            x[:, top : top + self.crop, left : left + self.crop],
            y[top : top + self.crop, left : left + self.crop],
        )
        if self.hflip and torch.rand(()).item() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()


class SegValTransform:
    """The whole image, optionally resized so its longer side is ``max_size`` (mask: nearest)."""

    def __init__(
        self,
        max_size: int | None = None,
        preprocess: str = "rgb_normalized",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.max_size, self.preprocess, self.mean, self.std = max_size, preprocess, mean, std

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_size and max(image.size) != self.max_size:
            s = self.max_size / max(image.size)
            size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
            image, mask = image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
        return to_tensors(image, mask, self.preprocess, self.mean, self.std)
