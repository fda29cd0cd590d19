"""Joint image/mask transforms for segmentation (``torchvision.transforms.v2`` on ``tv_tensors.Image`` and
``tv_tensors.Mask``): random scale, pad, crop and flip; normalisation.

Random draws come from torch's CPU generator, which the resumable train sampler seeds per sample, so the
crops of a sample depend on (seed, epoch, index) only: worker counts and resumption do not change them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from acon.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def to_tv_tensors(image: Image.Image, mask: Image.Image) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """The RGB image (uint8 CHW) and the class-index mask (uint8 HW) as ``tv_tensors``."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    return tv_tensors.Image(x), tv_tensors.Mask(torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()))


def resize_pair(image, mask, size: tuple[int, int]) -> tuple:
    """(image bilinear with antialiasing, mask nearest, centre-aligned as PIL's) at ``size`` (h, w)."""
    image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    return image, TF.resize(mask, list(size), interpolation=InterpolationMode.NEAREST_EXACT)


def normalise(image: torch.Tensor, preprocess: str, mean, std) -> torch.Tensor:
    """Float CHW: ``bgr_255`` the authors' BGR 0-255 input, else RGB in [0, 1] normalised by mean/std."""
    x = TF.to_dtype(image, torch.float32, scale=False)
    if preprocess == "bgr_255":
        return x.flip(0).as_subclass(torch.Tensor)
    return TF.normalize(x / 255.0, list(mean), list(std)).as_subclass(torch.Tensor)


def to_tensors(image: Image.Image, mask: Image.Image, preprocess: str, mean, std) -> tuple:
    """(normalised float CHW image, long HW mask). ``bgr_255``: the authors' BGR 0-255 input."""
    x, y = to_tv_tensors(image, mask)
    return normalise(x, preprocess, mean, std), y.as_subclass(torch.Tensor).long()


class SegTrainTransform:
    """Scale by a factor drawn from ``scale_range``, pad to ``crop_size`` (image 0 after normalisation,
    mask the ignore label), take a random ``crop_size`` square and flip horizontally with probability 0.5
    when ``hflip``."""

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
        x, y = resize_pair(*to_tv_tensors(image, mask), (h, w))
        x = tv_tensors.Image(normalise(x, self.preprocess, self.mean, self.std))
        y = tv_tensors.Mask(y.long())
        ph, pw = max(self.crop - h, 0), max(self.crop - w, 0)
        if ph or pw:
            x, y = TF.pad(x, [0, 0, pw, ph], fill=0.0), TF.pad(y, [0, 0, pw, ph], fill=self.ignore_index)
        top = int(torch.randint(y.shape[-2] - self.crop + 1, ()).item())
        left = int(torch.randint(y.shape[-1] - self.crop + 1, ()).item())
        x, y = TF.crop(x, top, left, self.crop, self.crop), TF.crop(y, top, left, self.crop, self.crop)
        if self.hflip and torch.rand(()).item() < 0.5:
            x, y = TF.horizontal_flip(x), TF.horizontal_flip(y)
        return x.as_subclass(torch.Tensor).contiguous(), y.as_subclass(torch.Tensor).contiguous()


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
        x, y = to_tv_tensors(image, mask)
        if self.max_size and max(image.size) != self.max_size:
            s = self.max_size / max(image.size)
            x, y = resize_pair(x, y, (max(1, round(image.height * s)), max(1, round(image.width * s))))
        return normalise(x, self.preprocess, self.mean, self.std), y.as_subclass(torch.Tensor).long()
