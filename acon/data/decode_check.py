"""Self-check of the GPU input pipeline's nvJPEG decoding: the first batch on a CUDA device is decoded on
the device and on the CPU and compared. A decode error or a difference beyond ``MAX_MEAN_ABS_DIFF``
(nvJPEG and libjpeg round their IDCT and chroma upsampling differently, by a level or two) gives one
warning (:mod:`acon.fallbacks`) and every later batch is decoded on the CPU and copied to the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from acon import fallbacks

MAX_MEAN_ABS_DIFF = 3.0  # mean |device - CPU| per pixel and channel, in 0..255 levels


def cpu_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode on the CPU (torchvision/libjpeg) and copy to ``device``."""
    from acon.data.gpu import decode_batch

    return [img.to(device, non_blocking=True) for img in decode_batch(data, torch.device("cpu"))]


def decode_difference(device_imgs: list[torch.Tensor], host_imgs: list[torch.Tensor]) -> str | None:
    """Why the device decode does not match the CPU decode, or None if it does."""
    if len(device_imgs) != len(host_imgs):
        return f"{len(device_imgs)} images decoded for a batch of {len(host_imgs)}"
    for i, (a, b) in enumerate(zip(device_imgs, host_imgs, strict=True)):
        if a.shape != b.shape:
            return f"image {i} decodes to shape {tuple(a.shape)} on the device, {tuple(b.shape)} on the CPU"
        diff = (a.cpu().float() - b.float()).abs().mean().item()
        if not diff <= MAX_MEAN_ABS_DIFF:
            return f"image {i} differs from the CPU decode by {diff:.1f} levels on average"
    return None


class CheckedDecoder:
    """Batch decoding on ``device`` whose first batch is checked against the CPU; CPU decoding after a
    failed check. ``check`` defaults to CUDA devices only (elsewhere both decoders are the same)."""

    def __init__(
        self, device: torch.device, device_decode: Callable | None = None, check: bool | None = None
    ) -> None:
        from acon.data.gpu import decode_batch

        self.device = device
        self.device_decode = device_decode or decode_batch
        self.pending = device.type == "cuda" if check is None else check
        self.on_cpu = False

    def __call__(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.on_cpu:
            return cpu_decode(data, self.device)
        if not self.pending:
            return self.device_decode(data, self.device)
        self.pending = False
        from acon.data.gpu import decode_batch

        host = decode_batch(data, torch.device("cpu"))
        try:
            imgs = self.device_decode(data, self.device)
            reason = decode_difference(imgs, host)
        except Exception as e:  # any failure of the device decoder is a failed check
            reason = f"{type(e).__name__}: {e}"
        if reason is None:
            return imgs
        self.on_cpu = True
        fallbacks.record(f"data.pipeline=gpu nvJPEG decode on {self.device}", reason)
        return [img.to(self.device, non_blocking=True) for img in host]
