"""GPU input path: encoded bytes from the workers, batched JPEG decoding and augmentation on the device.

Workers only read the file and draw the augmentation parameters (from the header size, with the seeded
torch RNG, so they match the reference pipeline sample for sample). :class:`DeviceAugment` then decodes
the whole batch with ``torchvision.io.decode_jpeg(..., device='cuda')``, crops, resizes, flips, applies
colour jitter and normalises on the device; :class:`DeviceLoader` runs that on a side CUDA stream one
batch ahead, so it overlaps with the previous step's compute. Every augmentation op here is plain torch
and runs on any device; on a CPU it is what the tests exercise.

It is also the batch stage of the fast CPU path (uint8 crops from the workers). On a CPU, jitter and
normalisation run per image as a few 3x4 matrix products into reused output buffers
(:mod:`acon.data.cpu_stage`), about 3x cheaper than the per-op passes of :func:`color_jitter_batch`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image

from acon.data.cpu_stage import OutputPool, WorkPlanes, jitter_normalize_cpu
from acon.data.decode_check import CheckedDecoder, decode_batch, nvjpeg_decodable
from acon.data.fast import (
    GRAY_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugBatch,
    EncodedBatch,
    jitter_params,
    jpeg_header,
    rrc_params,
)

__all__ = [
    "DeviceAugment",
    "DeviceLoader",
    "EncodedTrainTransform",
    "color_jitter_batch",
    "crop_resize_batch",
    "decode_batch",
    "nvjpeg_decodable",
]

PREPROCESS = ("rgb_normalized", "bgr_255")


class EncodedTrainTransform:
    """Worker side of the GPU path: keep the bytes, draw crop/jitter/flip from the header size."""

    def __init__(
        self,
        scale: tuple = (0.08, 1.0),
        ratio: tuple = (3 / 4, 4 / 3),
        color_jitter: float = 0.4,
        hflip: float = 0.5,
    ) -> None:
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.color_jitter, self.hflip = float(color_jitter), float(hflip)

    def __call__(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        header = jpeg_header(data)
        if header is None:  # not a JPEG: PIL reads the size from the header, without decoding
            width, height = Image.open(io.BytesIO(data.numpy().tobytes())).size
        else:
            width, height = header[:2]
        top, left, h, w = rrc_params(height, width, self.scale, self.ratio)
        jit = jitter_params(self.color_jitter)
        flip = bool(self.hflip > 0 and torch.rand(1).item() < self.hflip)
        return data, torch.tensor((top, left, h, w, float(flip), *jit), dtype=torch.float32)


def crop_resize_batch(images: list[torch.Tensor], boxes: list[list[float]], size: int) -> torch.Tensor:
    """Crop each uint8 CHW image to its (top, left, h, w) box and resize (bilinear, antialiased) to
    ``size``; returns float (B, 3, size, size) in 0..255 on the images' device."""
    device = images[0].device
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=device)
    for i, (img, box) in enumerate(zip(images, boxes, strict=True)):
        top, left, h, w = (int(v) for v in box[:4])
        height, width = img.shape[-2:]
        top, left = min(max(top, 0), height - 1), min(max(left, 0), width - 1)
        crop = img[:, top : top + max(h, 1), left : left + max(w, 1)].unsqueeze(0).float()
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i] = resized[0]
    return out


def color_jitter_batch(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, bound: float = 1.0
) -> torch.Tensor:
    """Per-sample brightness/contrast/saturation jitter of a float (B, 3, H, W) batch in [0, ``bound``].

    ``factors`` is (B, 3): brightness, contrast, saturation; ``order`` is (B, 3): which op (0, 1, 2)
    comes first, second and third for each sample, as torchvision's ColorJitter draws it. Each op is a
    blend ``f * x + (1 - f) * target`` clamped to the value range, as in PIL and torchvision, with target
    black (brightness), the mean grey level (contrast) or the per-pixel grey image (saturation); so one
    batched blend per step serves every sample whatever its op, with no device synchronisation.
    """
    factors, order = factors.to(x.dtype), order.long()
    for step in range(3):
        op = order[:, step : step + 1]
        f = factors.gather(1, op).view(-1, 1, 1, 1)
        w0, w1, w2 = GRAY_WEIGHTS
        gray = w0 * x[:, 0:1] + w1 * x[:, 1:2] + w2 * x[:, 2:3]
        mean = gray.mean(dim=(-2, -1), keepdim=True)
        target = torch.where((op == 2).view(-1, 1, 1, 1), gray, (op == 1).view(-1, 1, 1, 1) * mean)
        x = torch.lerp(target, x, f).clamp_(0, bound)
    return x


class DeviceAugment:
    """Batch stage of the fast and GPU paths: (decode, crop, flip,) colour jitter and normalise on ``device``.

    Accepts an :class:`AugBatch` whose images are either encoded bytes (GPU path: decoded and cropped
    here) or uint8 NCHW crops already made by workers (fast CPU path: only jitter and normalisation).
    Returns a normalised ``out_dtype`` batch (or, with ``preprocess="bgr_255"``, the authors'
    unnormalised BGR 0..255 input, as ``acon.data.transforms.ToBGR255``), channels-last by default on
    CUDA (where convolutions prefer it) and contiguous on a CPU (where writing it costs 5x more).
    On a CPU the output buffers are reused once nothing refers to a returned batch any more.
    """

    def __init__(
        self,
        img_size: int = 224,
        mean: tuple = IMAGENET_MEAN,
        std: tuple = IMAGENET_STD,
        color_jitter: bool = True,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype = torch.float32,
        out_dtype: torch.dtype = torch.float32,
        preprocess: str = "rgb_normalized",
        channels_last: bool | None = None,
    ) -> None:
        if preprocess not in PREPROCESS:
            raise ValueError(f"data.preprocess={preprocess!r} is not one of {PREPROCESS}")
        self.size, self.color_jitter, self.preprocess = int(img_size), bool(color_jitter), preprocess
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.compute_dtype, self.out_dtype = compute_dtype, out_dtype
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self._pool = OutputPool()
        self._bufs: WorkPlanes | None = None
        self._decode = CheckedDecoder(self.device)  # nvJPEG checked against the CPU, first batch and sampled

    def __call__(self, batch: AugBatch) -> torch.Tensor:
        params = batch.params.to(self.device, non_blocking=True)
        if isinstance(batch.images, EncodedBatch | list):
            host = batch.params if batch.params.device.type == "cpu" else batch.params.cpu()
            decoded = self._decode(list(batch.images))
            x = crop_resize_batch(decoded, host.tolist(), self.size).to(self.compute_dtype)
            flip = params[:, 4].view(-1, 1, 1, 1) > 0.5
            x = torch.where(flip, x.flip(-1), x)
        else:
            x = batch.images.to(self.device, non_blocking=True)
        out = self._new_output((x.shape[0], 3, x.shape[-2], x.shape[-1]))
        bgr = self.preprocess == "bgr_255"  # the authors' convention: BGR in 0..255, no normalisation
        if self.device.type == "cpu":
            mean = (0.0, 0.0, 0.0) if bgr else tuple(255 * float(m) for m in self.mean.flatten())
            scale = (1.0, 1.0, 1.0) if bgr else tuple(1 / (255 * float(s)) for s in self.std.flatten())
            planes = self._planes(x.shape[-2], x.shape[-1])
            for i, p in enumerate(batch.params.tolist()):
                jitter = (p[5:8], p[8:11]) if self.color_jitter else None
                jitter_normalize_cpu(x[i], out[i], jitter, mean, scale, bgr, planes)
            return out
        # everything in 0..255: normalising is then one subtract and one multiply into ``out``
        shift, scale = (self.mean * 255).to(self.compute_dtype), (1 / (255 * self.std)).to(self.compute_dtype)
        if bgr:
            shift, scale = torch.zeros_like(shift), torch.ones_like(scale)
        xi = x.to(self.compute_dtype, copy=True)
        if self.color_jitter:
            xi = color_jitter_batch(xi, params[:, 5:8], params[:, 8:11], bound=255.0)
        torch.mul(xi.sub_(shift).flip(1) if bgr else xi.sub_(shift), scale, out=out)
        return out

    def _new_output(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised output batch; on a CPU, from the pool of buffers nothing refers to any more."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.device.type != "cpu":
            return torch.empty(shape, dtype=self.out_dtype, device=self.device, memory_format=fmt)
        return self._pool.empty(shape, self.out_dtype, fmt)

    def _planes(self, height: int, width: int) -> WorkPlanes:
        """The CPU stage's work buffers, kept between batches."""
        p = self._bufs
        if p is None or p.shape != (height, width) or p.dtype != self.compute_dtype:
            self._bufs = p = WorkPlanes(height, width, self.compute_dtype)
        return p

    def __getstate__(self) -> dict:
        """Pickle without the buffers (they are caches)."""
        return {**self.__dict__, "_pool": OutputPool(self._pool.size), "_bufs": None}

    def __repr__(self) -> str:
        return (
            f"DeviceAugment(img_size={self.size}, color_jitter={self.color_jitter}, device={self.device}, "
            f"compute_dtype={self.compute_dtype}, out_dtype={self.out_dtype})"
        )


class DeviceLoader:
    """Iterate (images, targets, n_bad) with images augmented on ``device``, one batch ahead on a side stream.

    On CUDA, batch k+1 is copied, decoded and augmented on a separate stream while the caller computes
    on batch k; the main stream waits for it only when it is handed out. On a CPU it runs inline.
    """

    def __init__(self, loader: Iterable, transform: DeviceAugment | None, device: torch.device | str) -> None:
        self.loader, self.transform, self.device = loader, transform, torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def _prepare(self, batch):
        images, targets, n_bad = batch
        if images is None:  # every image of the batch was skipped
            return batch
        targets = targets.to(self.device, non_blocking=True)
        if self.transform is not None:
            images = self.transform(images)
        else:
            images = images.to(self.device, non_blocking=True)
        return images, targets, n_bad

    def __iter__(self) -> Iterator:
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self._prepare(batch)
            return
        stream = torch.cuda.Stream(self.device)
        pending = None
        for batch in self.loader:
            with torch.cuda.stream(stream):
                ready = self._prepare(batch)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in ready[:2]:
                if t is not None:  # None, None: every image of the batch was skipped
                    t.record_stream(torch.cuda.current_stream(self.device))
            pending = ready
        if pending is not None:
            yield pending
