"""Reference torchvision transforms: the paper's training and validation preprocessing."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ToRGB:
    """Decode a lazily opened PIL image to RGB (CMYK, grayscale, palette and RGBA included)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


class ToBGR255:
    """The authors' input convention: a float BGR tensor in 0–255 with no normalisation."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return T.functional.pil_to_tensor(img).flip(0).float()

    def __repr__(self) -> str:
        return "ToBGR255()"


def _to_tensor(preprocess: str, mean: tuple, std: tuple) -> list:
    if preprocess == "rgb_normalized":
        return [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    if preprocess == "bgr_255":
        return [ToBGR255()]
    raise ValueError(f"data.preprocess={preprocess!r} is not one of ('rgb_normalized', 'bgr_255')")


def train_transform(
    img_size: int = 224,
    color_jitter: float = 0.4,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    preprocess: str = "rgb_normalized",
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
) -> T.Compose:
    """RandomResizedCrop, ColorJitter(0.4, 0.4, 0.4), horizontal flip, then tensor conversion."""
    ops = [ToRGB(), T.RandomResizedCrop(img_size, scale=tuple(scale))]
    if color_jitter:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + _to_tensor(preprocess, mean, std))


def val_transform(
    img_size: int = 224,
    resize: int = 256,
    preprocess: str = "rgb_normalized",
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
) -> T.Compose:
    """Resize the short side to ``resize``, centre-crop ``img_size``, then tensor conversion."""
    ops = [ToRGB(), T.Resize(resize), T.CenterCrop(img_size)]
    return T.Compose(ops + _to_tensor(preprocess, mean, std))
