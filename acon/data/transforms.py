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

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        x = img if isinstance(img, torch.Tensor) else T.functional.pil_to_tensor(img)
        return x.flip(0).float()

    def __repr__(self) -> str:
        return "ToBGR255()"


_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE: uint8 resizing weights are multiples of 1/2048


def _linear_taps(src: int, dst: int, clamp_weight: bool) -> tuple[torch.Tensor, ...]:
    """(first source index, second source index, their weights in 1/2048) per output pixel, as OpenCV's
    INTER_LINEAR computes them: half-pixel centres, float32 offsets, weights rounded half to even.
    Horizontally a tap past an edge gets weight 0 (``clamp_weight``); vertically only the rows clamp."""
    f = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).to(torch.float32)
    i = torch.floor(f)
    f, i = f - i, i.long()
    if clamp_weight:
        f = torch.where((i < 0) | (i >= src - 1), torch.zeros_like(f), f)
        i = i.clamp(0, src - 1)
    w0 = torch.round((1 - f) * _COEF_SCALE).to(torch.int32)
    w1 = torch.round(f * _COEF_SCALE).to(torch.int32)
    return i.clamp(0, src - 1), (i + 1).clamp(0, src - 1), w0, w1


def resize_linear_opencv(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A uint8 (C, H, W) image resized like ``cv2.resize(..., INTER_LINEAR)``: bilinear with half-pixel
    centres and no antialiasing, in OpenCV's fixed-point arithmetic (its vectorised rounding), pixel-exact."""
    c, h, w = img.shape
    x0, x1, a0, a1 = _linear_taps(w, width, True)
    y0, y1, b0, b1 = _linear_taps(h, height, False)
    s = img.to(torch.int32)
    rows = (s[:, :, x0] * a0 + s[:, :, x1] * a1) >> 4  # horizontal pass, then OpenCV's 16-bit packing
    out = ((rows[:, y0] * b0[:, None]) >> 16) + ((rows[:, y1] * b1[:, None]) >> 16)
    return ((out + 2) >> 2).clamp_(0, 255).to(torch.uint8)


def authors_resize_size(height: int, width: int, size: int = 256) -> tuple[int, int]:
    """(height, width) with the short side ``size`` and the long side rounded as the authors' eval does."""
    if height < width:
        return size, int(size / height * width + 0.5)
    return int(size / width * height + 0.5), size


class OpenCVResize:
    """The authors' evaluation resize: short side to ``size`` with OpenCV INTER_LINEAR (no antialiasing)
    and a rounded long side, on a PIL image or uint8 CHW tensor -> uint8 CHW tensor."""

    def __init__(self, size: int = 256) -> None:
        self.size = int(size)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        x = img if isinstance(img, torch.Tensor) else T.functional.pil_to_tensor(img)
        return resize_linear_opencv(x, *authors_resize_size(x.shape[1], x.shape[2], self.size))

    def __repr__(self) -> str:
        return f"OpenCVResize({self.size})"


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
    """Resize the short side to ``resize``, centre-crop ``img_size``, then tensor conversion.

    ``bgr_255`` (the authors' released checkpoints) resizes as their evaluation does (:class:`OpenCVResize`);
    otherwise torchvision's antialiased ``Resize``.
    """
    resize_op = OpenCVResize(resize) if preprocess == "bgr_255" else T.Resize(resize)
    ops = [ToRGB(), resize_op, T.CenterCrop(img_size)]
    return T.Compose(ops + _to_tensor(preprocess, mean, std))
