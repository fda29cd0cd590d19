"""Fast CPU input path: cheapest decoder per sample, one-step crop-resize, uint8 batches normalised later.

The reference training transform decodes every JPEG with PIL at full size, crops, resizes, jitters
colours in PIL, converts to float and normalises, all per sample in a loader worker. Here a worker only:

1. samples the RandomResizedCrop box from the size in the header (read by :func:`jpeg_header`, or by
   PIL's lazy open for other formats; no decoding yet), drawing torch random numbers in the same order
   as the reference, so a seeded sample gets the same crop, jitter factors and flip as it would in the
   reference pipeline;
2. decodes with torchvision.io (libjpeg-turbo straight into a tensor, about 1.5x faster than PIL here)
   and crops + resizes the uint8 tensor with torch's SIMD antialiased kernel (on packed RGB pixels, its
   fast path), or, when the crop is downscaled by >= 2 anyway, lets PIL decode at 1/2, 1/4 or 1/8 DCT
   scale (draft mode) and crops and resizes in a single ``Image.resize(box=...)``;
3. returns a contiguous uint8 CHW tensor plus the sampled parameters (a quarter of the bytes of a float
   tensor).

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
from torch.utils.data import default_collate
from torchvision.transforms import functional as TF

from acon.data.bad_images import decoding, split_batch
from acon.data.transforms import IMAGENET_MEAN, IMAGENET_STD, OpenCVResize

__all__ = [
    "GRAY_WEIGHTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PARAM_DIM",
    "AugBatch",
    "FastTrainTransform",
    "FastValTransform",
    "DECODERS",
    "EncodedBatch",
    "collate_augment",
    "jitter_params",
    "jpeg_header",
    "read_bytes",
    "rrc_params",
]

# Per-sample parameter vector: crop top, left, height, width; flip; brightness, contrast, saturation
# factors; the order in which the three colour ops are applied (0=brightness, 1=contrast, 2=saturation).
PARAM_DIM = 11
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # grey level as PIL's "L" conversion, which ColorJitter follows
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


def _planar(hwc: np.ndarray, flip: bool = False) -> torch.Tensor:
    """(H, W, 3) uint8 pixels -> contiguous (3, H, W), mirrored if ``flip``, in one numpy copy (torch's
    uint8 de-interleaving copy is about twice as slow; the batch collate then copies plainly)."""
    return torch.from_numpy(np.array((hwc[:, ::-1] if flip else hwc).transpose(2, 0, 1), order="C"))


DECODERS = ("auto", "pil", "tvio")


_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # PIL's mode for the frame's component count


def jpeg_header(data: torch.Tensor) -> tuple[int, int, str] | None:
    """(width, height, PIL mode) from a JPEG's frame header, or None when ``data`` is not a JPEG whose
    frame header comes before its scan (then open it with PIL). 10x cheaper than ``PIL.Image.open``."""
    buf = memoryview(data.numpy())
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    i = 2
    while i + 9 < n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF_MARKERS:
            mode = _JPEG_MODES.get(buf[i + 9])
            width, height = (buf[i + 7] << 8) | buf[i + 8], (buf[i + 5] << 8) | buf[i + 6]
            return (width, height, mode) if mode and width and height else None
        elif marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + ((buf[i + 2] << 8) | buf[i + 3])
    return None


def _open(data: torch.Tensor | Image.Image) -> Image.Image:
    if isinstance(data, Image.Image):
        return data
    with decoding():
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

    def _use_tvio(self, fmt: str | None, mode: str, data, crop_h: int, crop_w: int) -> bool:
        if self.decoder == "pil" or not isinstance(data, torch.Tensor):
            return False
        if fmt not in ("JPEG", "PNG") or mode not in ("RGB", "L"):
            return False
        return self.decoder == "tvio" or min(crop_h, crop_w) < 2 * self.size

    def __call__(self, data: torch.Tensor | Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        header = jpeg_header(data) if isinstance(data, torch.Tensor) and self.decoder != "pil" else None
        if header is not None:  # PIL opens the image only if it decodes it
            img, (width, height, mode), fmt = None, header, "JPEG"
        else:
            img = _open(data)
            (width, height), mode, fmt = img.size, img.mode, img.format
        top, left, h, w = rrc_params(height, width, self.scale, self.ratio)
        jit = jitter_params(self.color_jitter)
        flip = bool(self.hflip > 0 and torch.rand(1).item() < self.hflip)
        if self._use_tvio(fmt, mode, data, h, w):
            from torchvision.io import ImageReadMode, decode_image

            with decoding():  # a DecodeError, so the dataset's bad-image policy applies
                x = decode_image(data, mode=ImageReadMode.RGB)
            # packed (channels-last) pixels take the uint8 SIMD resize's fast path: 1.7x faster here
            x = x[None, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)[0]
            hwc = x.permute(1, 2, 0).numpy()
            if self.jitter_in_worker and self.color_jitter:
                hwc, jit = np.asarray(_pil_jitter(Image.fromarray(hwc), jit)), _NO_JITTER
            x = _planar(hwc, flip)
        else:
            x = self._pil_crop(img if img is not None else _open(data), top, left, h, w, flip, jit)
            jit = _NO_JITTER if self.jitter_in_worker and self.color_jitter else jit
        return x, torch.tensor((top, left, h, w, float(flip), *jit), dtype=torch.float32)

    def _pil_crop(
        self, img: Image.Image, top: int, left: int, h: int, w: int, flip: bool, jit
    ) -> torch.Tensor:
        with decoding():
            if img.mode not in (
                "RGB",
                "L",
            ):  # CMYK, palette, RGBA: convert at full size, as the reference does
                img = img.convert("RGB")
            s = _draft_scale(img, h, w, self.size) if self.decoder != "tvio" else 1.0
            img.load()  # decode now (at the draft scale): a failure here is the file's
        box = (left / s, top / s, (left + w) / s, (top + h) / s)
        out = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        out = out if out.mode == "RGB" else out.convert("RGB")
        if self.jitter_in_worker and self.color_jitter:
            out = _pil_jitter(out, jit)
        return _planar(np.asarray(out), flip)

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
    """Resize(short side) + CenterCrop exactly as the reference, returned as (uint8 CHW, identity params).

    ``preprocess="bgr_255"`` resizes as the authors' evaluation does (:class:`OpenCVResize`), as the
    reference ``val_transform`` does then.
    """

    def __init__(self, img_size: int = 224, resize: int = 256, preprocess: str = "rgb_normalized") -> None:
        self.size, self.resize, self.preprocess = int(img_size), int(resize), preprocess
        self._authors = OpenCVResize(resize) if preprocess == "bgr_255" else None
        self._params = torch.tensor((0, 0, 0, 0, 0.0, *_NO_JITTER), dtype=torch.float32)

    def __call__(self, data: torch.Tensor | Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img = _open(data)
        with decoding():
            img = img if img.mode == "RGB" else img.convert("RGB")
            img.load()
        if self._authors is not None:
            return TF.center_crop(self._authors(img), self.size).contiguous(), self._params.clone()
        img = TF.center_crop(TF.resize(img, self.resize), self.size)
        return _planar(np.asarray(img)), self._params.clone()

    def __repr__(self) -> str:
        return f"FastValTransform(img_size={self.size}, resize={self.resize}, preprocess={self.preprocess!r})"


@dataclass
class EncodedBatch:
    """The encoded files of a batch in one flat uint8 tensor; image ``i`` is ``data[offsets[i]:offsets[i+1]]``.

    One tensor (one shared-memory file descriptor when a loader worker sends it) whatever the batch size,
    where a list of byte tensors would cost one descriptor per image in the worker and in the trainer.
    """

    data: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_list(cls, parts: list[torch.Tensor]) -> EncodedBatch:
        """Concatenate ``parts`` (1-D uint8); in a loader worker, straight into shared memory."""
        sizes = [int(p.numel()) for p in parts]
        offsets = torch.zeros(len(parts) + 1, dtype=torch.long)
        torch.cumsum(torch.tensor(sizes, dtype=torch.long), 0, out=offsets[1:])
        flat = None
        if torch.utils.data.get_worker_info() is not None:  # as default_collate: no copy when sent
            storage = parts[0]._typed_storage()._new_shared(sum(sizes), device=parts[0].device)
            flat = parts[0].new(storage)
        return cls(torch.cat([p.reshape(-1) for p in parts], out=flat), offsets)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        bounds = self.offsets[i : i + 2].tolist()
        return self.data[bounds[0] : bounds[1]]

    def tolist(self) -> list[torch.Tensor]:
        """Every image's bytes, as views of the flat tensor (no copy)."""
        o = self.offsets.tolist()
        return [self.data[a:b] for a, b in zip(o[:-1], o[1:], strict=True)]

    def __iter__(self):
        return iter(self.tolist())

    def pin_memory(self) -> EncodedBatch:
        """Pinned copy (the CPU decoder and nvJPEG read it from host memory)."""
        return EncodedBatch(self.data.pin_memory(), self.offsets)


@dataclass
class AugBatch:
    """A collated batch before device augmentation: uint8 NCHW images or encoded bytes, plus params."""

    images: torch.Tensor | EncodedBatch
    params: torch.Tensor

    def pin_memory(self) -> AugBatch:
        """Pinned copy (called by DataLoader(pin_memory=True))."""
        return AugBatch(self.images.pin_memory(), self.params.pin_memory())

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

    Decoded uint8 CHW images are stacked into a uint8 NCHW tensor (in shared memory when called in a
    DataLoader worker, as ``default_collate`` does, so that sending it costs no copy); encoded byte tensors
    (variable length) are concatenated into one :class:`EncodedBatch`. Either way a batch is a few
    tensors, so a few file descriptors, whatever its size. Skipped bad images are dropped and counted.
    """
    good, bad = split_batch(batch, allow_empty=True)
    if not good:  # every image was bad (data.bad_image_policy=skip): the step is skipped on every rank
        return None, None, bad
    first = good[0][0][0]
    params = torch.stack([s[0][1] for s in good])
    targets = torch.tensor([s[1] for s in good], dtype=torch.long)
    if first.dim() == 3:  # in a loader worker, stacked straight into shared memory (no extra copy)
        images = default_collate([s[0][0] for s in good])
    else:
        images = EncodedBatch.from_list([s[0][0] for s in good])
    return AugBatch(images, params), targets, bad
