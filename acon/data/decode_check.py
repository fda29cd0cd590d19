"""Batched JPEG decoding for the GPU input pipeline (:func:`decode_batch`: nvJPEG on CUDA, libjpeg on the
CPU) and its self-check against the CPU: the whole first batch on a CUDA device, then one image of every
``CHECK_EVERY``-th batch (a different one each time; one CPU decode, so cheap). A decode error or a
difference beyond ``MAX_MEAN_ABS_DIFF`` (nvJPEG and libjpeg round their IDCT and chroma upsampling
differently, by a level or two) gives one warning (:mod:`acon.fallbacks`) and every later batch is decoded
on the CPU and copied to the device."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from acon import fallbacks
from acon.data.fast import jpeg_header

MAX_MEAN_ABS_DIFF = 3.0  # mean |device - CPU| per pixel and channel, in 0..255 levels
CHECK_EVERY = 200  # after the first batch, one sampled image of every CHECK_EVERY-th batch is checked


def nvjpeg_decodable(data: torch.Tensor) -> bool:
    """Whether nvJPEG takes ``data``: a JPEG with 1 or 3 components (not CMYK, not a PNG named .JPEG)."""
    header = jpeg_header(data)
    return header is not None and header[2] in ("L", "RGB")


def _upload(img: torch.Tensor, device: torch.device) -> torch.Tensor:
    return img.to(device, non_blocking=True)


def _decode_on_cpu(data: torch.Tensor, index: int) -> torch.Tensor:
    """One image on the CPU (any format torchvision reads); a grey image, with a warning, if it is corrupt."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:  # corrupt file: a grey image, so that the step still runs
        warnings.warn(f"image {index} of the batch cannot be decoded ({e}); using a grey image", stacklevel=3)
        return torch.full((3, 8, 8), 128, dtype=torch.uint8)


def _nvjpeg(data: torch.Tensor | list[torch.Tensor], device: torch.device):
    """``decode_jpeg`` to RGB on CUDA once the current stream's queued work is done: nvJPEG writes its outputs,
    blocks the caching allocator may have just recycled on that stream, without waiting for it
    (pytorch/vision#9606), which could overwrite the previous batch's augmentation inputs. The decode blocks
    the host anyway, so the wait costs little."""
    from torchvision.io import ImageReadMode, decode_jpeg

    torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decode_batch(data: Iterable[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode encoded images to uint8 RGB CHW on ``device``: one batched nvJPEG call on CUDA.

    Files nvJPEG cannot take (CMYK JPEGs, PNGs named .JPEG; told from their header) are decoded on the
    CPU and copied over, the rest of the batch still in one nvJPEG call; a file nothing can decode
    becomes a grey image, with a warning.
    """
    data = list(data)
    out: list[torch.Tensor | None] = [None] * len(data)
    batched = [i for i, d in enumerate(data) if nvjpeg_decodable(d)] if device.type == "cuda" else []
    if batched:
        try:
            imgs = _nvjpeg([data[i] for i in batched], device)
        except RuntimeError:  # a file whose header looked fine: decode these one by one
            imgs = [None] * len(batched)
            for k, i in enumerate(batched):
                try:
                    imgs[k] = _nvjpeg(data[i], device)
                except RuntimeError:
                    pass
        for i, img in zip(batched, imgs, strict=True):
            out[i] = img
    return [
        img if img is not None else _upload(_decode_on_cpu(d, i), device)
        for i, (d, img) in enumerate(zip(data, out, strict=True))
    ]


def cpu_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode on the CPU (torchvision/libjpeg) and copy to ``device``."""
    return [img.to(device, non_blocking=True) for img in decode_batch(data, torch.device("cpu"))]


def decode_difference(
    device_imgs: list[torch.Tensor], host_imgs: list[torch.Tensor], indices: list[int] | None = None
) -> str | None:
    """Why the device decode does not match the CPU decode, or None if it does (``indices``: the images'
    places in their batch)."""
    if len(device_imgs) != len(host_imgs):
        return f"{len(device_imgs)} images decoded for a batch of {len(host_imgs)}"
    for i, a, b in zip(indices or range(len(host_imgs)), device_imgs, host_imgs, strict=True):
        if a.shape != b.shape:
            return f"image {i} decodes to shape {tuple(a.shape)} on the device, {tuple(b.shape)} on the CPU"
        diff = (a.cpu().float() - b.float()).abs().mean().item()
        if not diff <= MAX_MEAN_ABS_DIFF:
            return f"image {i} differs from the CPU decode by {diff:.1f} levels on average"
    return None


class CheckedDecoder:
    """Batch decoding on ``device``, checked against the CPU on the first batch and on a sampled image of
    every ``every``-th batch; CPU decoding after a failed check. ``check`` defaults to CUDA devices only
    (elsewhere both decoders are the same)."""

    def __init__(
        self,
        device: torch.device,
        device_decode: Callable | None = None,
        check: bool | None = None,
        every: int = CHECK_EVERY,
    ) -> None:
        self.device = device
        self.device_decode = device_decode or decode_batch
        self.check = device.type == "cuda" if check is None else check
        self.every, self.batches = max(int(every), 1), 0
        self.on_cpu = False

    def __call__(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.on_cpu:
            return cpu_decode(data, self.device)
        n, self.batches = self.batches, self.batches + 1
        if not self.check or (n > 0 and n % self.every):
            return self.device_decode(data, self.device)
        pick = list(range(len(data))) if n == 0 else [(n // self.every - 1) % len(data)]
        host = decode_batch([data[i] for i in pick], torch.device("cpu"))
        try:
            imgs = self.device_decode(data, self.device)
            reason = decode_difference([imgs[i] for i in pick], host, pick)
        except Exception as e:  # any failure of the device decoder is a failed check
            reason = f"{type(e).__name__}: {e}"
        if reason is None:
            return imgs
        if n > 0:
            reason = f"batch {n}: {reason}"
        self.on_cpu = True
        fallbacks.record(f"data.pipeline=gpu nvJPEG decode on {self.device}", reason)
        if n == 0:
            return [img.to(self.device, non_blocking=True) for img in host]
        return cpu_decode(data, self.device)
