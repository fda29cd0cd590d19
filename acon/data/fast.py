"""Fast CPU input path: cheapest decoder per sample, one-step crop-resize, uint8 batches normalised later.

The reference training transform decodes every JPEG with PIL at full size, crops, resizes, jitters
colours in PIL, converts to float and normalises, all per sample in a loader worker. Here a worker only:

1. samples the RandomResizedCrop box from the header size of the lazily opened image (no decoding yet),
   drawing torch random numbers in the same order as the reference, so a seeded sample gets the same
   crop, jitter factors and flip as it would in the reference pipeline;
2. decodes with torchvision.io (libjpeg-turbo straight into a tensor, about 1.5x faster than PIL here)
   and crops + resizes the uint8 tensor with torchvision's SIMD antialiased kernel, or, when the crop is
   downscaled by >= 2 anyway, lets PIL decode at 1/2, 1/4 or 1/8 DCT scale (draft mode) and crops and
   resizes in a single ``Image.resize(box=...)``;
3. returns a uint8 CHW tensor plus the sampled parameters (a quarter of the bytes of a float tensor).

Colour jitter and normalisation then run on the whole batch (:class:`acon.data.gpu.DeviceAugment`),
on the training device. ``jitter_in_worker=True`` keeps PIL's colour jitter in the worker instead.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from acon.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PARAM_DIM",
    "AugBatch",
    "FastTrainTransform",
    "FastValTransform",
    "DECODERS",
    "collate_augment",
    "jitter_params",
    "read_bytes",
    "rrc_params",
]

# Per-sample parameter vector: crop top, left, height, width; flip; brightness, contrast, saturation
# factors; the order in which the three colour ops are applied (0=brightness, 1=contrast, 2=saturation).
PARAM_DIM = 11
_NO_JITTER = (1.0, 1.0, 1.0, 0.0, 1.0, 2.0)


@functools.lru_cache(maxsize=8)
def _log_ratio(ratio: tuple) -> torch.Tensor:
    return torch.log(torch.tensor(ratio))


def rrc_params(
    height: int, width: int, scale: tuple = (0.08, 1.0), ratio: tuple = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w), drawing torch random numbers in torchvision's order."""
    area = height * width
    log_ratio = _log_ratio(tuple(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def jitter_params(strength: float) -> tuple[float, ...]:
    """(brightness, contrast, saturation, order of the three ops) as torchvision's ColorJitter draws them."""
    if not strength:
        return _NO_JITTER
    perm = torch.randperm(4)  # torchvision permutes four ops; hue (3) is disabled here
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    b, c, s = (float(torch.empty(1).uniform_(lo, hi)) for _ in range(3))
    order = [float(i) for i in perm.tolist() if i != 3]
    return (b, c, s, *order)


def read_bytes(path: str) -> torch.Tensor:
    """The file's encoded bytes as a uint8 tensor (the input of torchvision.io and GPU decoding)."""
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def _draft_scale(img: Image.Image, crop_h: int, crop_w: int, size: int) -> float:
    """Ask libjpeg for DCT-scaled decoding when the crop shrinks by >= 2; return the scale it chose."""
    if img.format != "JPEG":
        return 1.0
    shrink = min(crop_w / size, crop_h / size)
    r = next((r for r in (8, 4, 2) if r <= shrink), 1)
    if r == 1:
        return 1.0
    width, height = img.size
    res = img.draft("RGB", (max(1, width // r), max(1, height // r)))
    if res is None:
        return 1.0
    return width / res[1][2]


def _to_uint8_hwc(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8))  # one copy; writable for torch


DECODERS = ("auto", "pil", "tvio")


def _open(data: torch.Tensor | Image.Image) -> Image.Image:
    if isinstance(data, Image.Image):
        return data
    return Image.open(io.BytesIO(data.numpy().tobytes()))  # lazily: reads the header only


class FastTrainTransform:
    """RandomResizedCrop + flip with the cheapest decoder for each sample -> (uint8 CHW, params).

    Input: encoded bytes (uint8 tensor, see :func:`read_bytes`) or a lazily opened PIL image. With
    ``decoder="auto"`` a JPEG whose crop shrinks by >= 2 is decoded by PIL at 1/2, 1/4 or 1/8 DCT scale;
    any other JPEG/PNG is decoded by torchvision.io (libjpeg-turbo straight into a tensor) and cropped and
    resized as uint8; other formats and modes (CMYK, palette) go through PIL at full size.
    Colour jitter is left to the batch stage unless ``jitter_in_worker`` (then PIL's, as the reference).
    """

    def __init__(
        self,
        img_size: int = 224,
        scale: tuple = (0.08, 1.0),
        ratio: tuple = (3 / 4, 4 / 3),
        color_jitter: float = 0.4,
        hflip: float = 0.5,
        decoder: str = "auto",
        jitter_in_worker: bool = False,
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"decoder={decoder!r} is not one of {DECODERS}")
        self.size, self.scale, self.ratio = int(img_size), tuple(scale), tuple(ratio)
        self.color_jitter, self.hflip = float(color_jitter), float(hflip)
        self.decoder, self.jitter_in_worker = decoder, jitter_in_worker

    def _use_tvio(self, img: Image.Image, data, crop_h: int, crop_w: int) -> bool:
        if self.decoder == "pil" or not isinstance(data, torch.Tensor):
            return False
        if img.format not in ("JPEG", "PNG") or img.mode not in ("RGB", "L"):
            return False
        return self.decoder == "tvio" or min(crop_h, crop_w) < 2 * self.size

    def __call__(self, data: torch.Tensor | Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img = _open(data)
        width, height = img.size
        top, left, h, w = rrc_params(height, width, self.scale, self.ratio)
        jit = jitter_params(self.color_jitter)
        flip = bool(self.hflip > 0 and torch.rand(1).item() < self.hflip)
        if self._use_tvio(img, data, h, w):
            from torchvision.io import ImageReadMode, decode_image

            try:
                x = decode_image(data, mode=ImageReadMode.RGB)
            except RuntimeError as e:  # as OSError, so the dataset's bad-image policy applies
                raise OSError(f"torchvision cannot decode the image: {e}") from e
            x = x[None, :, top : top + h, left : left + w]  # a view: no copy before the resize
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)[0]
            if self.jitter_in_worker and self.color_jitter:
                x, jit = TF.pil_to_tensor(_pil_jitter(TF.to_pil_image(x), jit)), _NO_JITTER
            x = x.flip(-1) if flip else x
        else:
            x = self._pil_crop(img, top, left, h, w, flip, jit)
            jit = _NO_JITTER if self.jitter_in_worker and self.color_jitter else jit
        return x, torch.tensor((top, left, h, w, float(flip), *jit), dtype=torch.float32)

    def _pil_crop(
        self, img: Image.Image, top: int, left: int, h: int, w: int, flip: bool, jit
    ) -> torch.Tensor:
        if img.mode not in ("RGB", "L"):  # CMYK, palette, RGBA: convert at full size, as the reference does
            img = img.convert("RGB")
        s = _draft_scale(img, h, w, self.size) if self.decoder != "tvio" else 1.0
        box = (left / s, top / s, (left + w) / s, (top + h) / s)
        out = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        out = out if out.mode == "RGB" else out.convert("RGB")
        if self.jitter_in_worker and self.color_jitter:
            out = _pil_jitter(out, jit)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_uint8_hwc(out).permute(2, 0, 1)

    def __repr__(self) -> str:
        return (
            f"FastTrainTransform(img_size={self.size}, scale={self.scale}, color_jitter={self.color_jitter}, "
            f"hflip={self.hflip}, decoder={self.decoder!r}, jitter_in_worker={self.jitter_in_worker})"
        )


def _pil_jitter(img: Image.Image, jit: tuple[float, ...]) -> Image.Image:
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k in jit[3:]:
        img = ops[int(k)](img, jit[int(k)])
    return img


class FastValTransform:
    """Resize(short side) + CenterCrop exactly as the reference, returned as (uint8 CHW, identity params)."""

    def __init__(self, img_size: int = 224, resize: int = 256) -> None:
        self.size, self.resize = int(img_size), int(resize)
        self._params = torch.tensor((0, 0, 0, 0, 0.0, *_NO_JITTER), dtype=torch.float32)

    def __call__(self, data: torch.Tensor | Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img = _open(data)
        img = img if img.mode == "RGB" else img.convert("RGB")
        img = TF.center_crop(TF.resize(img, self.resize), self.size)
        return _to_uint8_hwc(img).permute(2, 0, 1), self._params.clone()

    def __repr__(self) -> str:
        return f"FastValTransform(img_size={self.size}, resize={self.resize})"


@dataclass
class AugBatch:
    """A collated batch before device augmentation: uint8 NCHW images or encoded bytes, plus params."""

    images: torch.Tensor | list[torch.Tensor]
    params: torch.Tensor

    def pin_memory(self) -> AugBatch:
        """Pinned copy (called by DataLoader(pin_memory=True))."""
        imgs = self.images.pin_memory() if isinstance(self.images, torch.Tensor) else self.images
        return AugBatch(imgs, self.params.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> AugBatch:
        """Move decoded images and params; encoded bytes stay on the host for the decoder."""
        imgs = self.images
        if isinstance(imgs, torch.Tensor):
            imgs = imgs.to(device, non_blocking=non_blocking)
        return AugBatch(imgs, self.params.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return len(self.images)


def collate_augment(batch: list) -> tuple[AugBatch, torch.Tensor, int]:
    """Collate ((image, params), target) samples into (AugBatch, targets, number of bad samples skipped).

    Decoded uint8 CHW images are stacked into a uint8 NCHW tensor; encoded byte tensors
    (variable length) stay a list. ``None`` samples (skipped bad images) are dropped and counted.
    """
    good = [b for b in batch if b is not None]
    if not good:
        raise RuntimeError(f"every image in a batch of {len(batch)} failed to decode")
    first = good[0][0][0]
    params = torch.stack([s[0][1] for s in good])
    targets = torch.tensor([s[1] for s in good], dtype=torch.long)
    if first.dim() == 3:
        images = torch.empty((len(good), *first.shape), dtype=torch.uint8)
        for i, s in enumerate(good):
            images[i].copy_(s[0][0])
    else:
        images = [s[0][0] for s in good]
    return AugBatch(images, params), targets, len(batch) - len(good)
