"""GPU input path: encoded bytes from the workers, batched JPEG decoding and augmentation on the device.

Workers only read the file and draw the augmentation parameters (from the header size, with the seeded
torch RNG, so they match the reference pipeline sample for sample). :class:`DeviceAugment` then decodes
the whole batch with ``torchvision.io.decode_jpeg(..., device='cuda')``, crops, resizes, flips, applies
colour jitter and normalises on the device; :class:`DeviceLoader` runs that on a side CUDA stream one
batch ahead, so it overlaps with the previous step's compute. Every augmentation op here is plain torch
and runs on any device; on a CPU it is what the tests exercise.

It is also the batch stage of the fast CPU path (uint8 crops from the workers). On a CPU, jitter and
normalisation run per image as a few 3x4 matrix products (:func:`jitter_normalize_cpu`) into reused
output buffers, about 3x cheaper than the per-op passes of :func:`color_jitter_batch`.
"""

from __future__ import annotations

import io
import math
import sys
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image

from acon.data.fast import IMAGENET_MEAN, IMAGENET_STD, AugBatch, jitter_params, jpeg_header, rrc_params

__all__ = [
    "DeviceAugment",
    "DeviceLoader",
    "EncodedTrainTransform",
    "WorkPlanes",
    "color_jitter_batch",
    "color_jitter_image",
    "crop_resize_batch",
    "decode_batch",
    "jitter_normalize_cpu",
]

_GRAY = (0.299, 0.587, 0.114)
PREPROCESS = ("rgb_normalized", "bgr_255")
_POOL_SIZE = 3  # CPU output batches kept for reuse: the one being consumed, the next, one spare
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


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


def decode_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode encoded images to uint8 RGB CHW on ``device``: one batched nvJPEG call on CUDA.

    Files nvJPEG rejects (CMYK JPEGs, PNGs named .JPEG) fall back to CPU decoding one by one; a file
    nothing can decode becomes a grey image, with a warning.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if device.type == "cuda":
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
    out = []
    for i, d in enumerate(data):
        try:
            if device.type == "cuda":
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                    continue
                except RuntimeError:
                    pass
            out.append(decode_image(d, mode=ImageReadMode.RGB).to(device))
        except RuntimeError as e:  # corrupt file: a grey image, so that the step still runs
            warnings.warn(f"image {i} of the batch cannot be decoded ({e}); using a grey image", stacklevel=2)
            out.append(torch.full((3, 8, 8), 128, dtype=torch.uint8, device=device))
    return out


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
        gray = _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]
        mean = gray.mean(dim=(-2, -1), keepdim=True)
        target = torch.where((op == 2).view(-1, 1, 1, 1), gray, (op == 1).view(-1, 1, 1, 1) * mean)
        x = torch.lerp(target, x, f).clamp_(0, bound)
    return x


def color_jitter_image(
    x: torch.Tensor, factors: list[float], order: list[float], bound: float
) -> torch.Tensor:
    """:func:`color_jitter_batch` for one (1, 3, H, W) image with host-side parameters, in place: each
    step runs only its own op, one or two passes over the image (the per-op form of
    :func:`jitter_normalize_cpu`, which the CPU batch stage runs instead)."""
    for k in (int(o) for o in order):
        f = factors[k]
        if k == 0:
            x.mul_(f)
        elif k == 1:
            mean = sum(w * float(m) for w, m in zip(_GRAY, x.mean(dim=(0, 2, 3)), strict=True))
            x.mul_(f).add_((1 - f) * mean)
        else:
            gray = _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]
            x.mul_(f).add_(gray.mul_(1 - f))
        x.clamp_(0, bound)
    return x


class WorkPlanes:
    """Work buffers of :func:`jitter_normalize_cpu` for (3, height, width) images, reused between images.

    Two stacks of (4, height * width) planes: three colour planes and a plane of ones, which turns each
    affine colour map into one matrix product (the bias is its fourth column); plus that (3, 4) matrix.
    Not thread-safe: one per caller.
    """

    def __init__(self, height: int, width: int, dtype: torch.dtype = torch.float32) -> None:
        buf = torch.empty((2, 4, height * width), dtype=dtype)
        buf[:, 3] = 1
        self.shape, self.dtype = (height, width), dtype
        self.full = (buf[0], buf[1])
        self.rgb = (buf[0, :3], buf[1, :3])
        self.image = (buf[0, :3].view(3, height, width), buf[1, :3].view(3, height, width))
        self.matrix = torch.empty((3, 4), dtype=dtype)
        self._host = self.matrix.numpy().reshape(-1) if dtype == torch.float32 else None

    def affine(self, rows: list[float], src: int, out: torch.Tensor) -> torch.Tensor:
        """out = rows (3x4, row-major) @ (planes ``src``; ones): one matrix product over the pixels."""
        if self._host is not None:
            self._host[:] = rows
            m = self.matrix
        else:
            m = torch.tensor(rows, dtype=self.dtype).view(3, 4)
        return torch.mm(m, self.full[src], out=out)


def jitter_normalize_cpu(
    x: torch.Tensor,
    out: torch.Tensor,
    jitter: tuple[list[float], list[float]] | None,
    mean: tuple[float, float, float],
    scale: tuple[float, float, float],
    bgr: bool = False,
    planes: WorkPlanes | None = None,
) -> torch.Tensor:
    """Colour jitter and normalise one (3, H, W) image in 0..255 into ``out``: the CPU batch stage.

    Computes what :func:`color_jitter_image` (bound 255) followed by ``(x - mean) * scale`` computes
    (channels reversed after that when ``bgr``), with ``jitter`` = (factors, order) as in the parameter
    vector, or None. Each op is affine and keeps the image in the form ``a * y + c * grey(y) + b``:
    brightness scales a, c and b; contrast scales them and moves b towards the grey mean (from the
    per-channel means of y); saturation moves c. So the ops compose into three numbers on the host, and
    the pixels are only touched to apply them, as one (3 x 4) matrix product, where an op has a factor
    > 1: only then can its result leave 0..255 and need the op's clamp (a blend with factor <= 1 stays
    in range, so its clamp is a no-op). Cost: one uint8 -> float copy, one product and clamp per
    factor > 1 and one product, with the normalisation folded in, written into ``out``.
    """
    planes = planes if planes is not None else WorkPlanes(x.shape[-2], x.shape[-1])
    src = 0
    planes.image[src].copy_(x)
    a, c, b = 1.0, 0.0, 0.0  # the image is a * y + c * grey(y) + b, y the planes ``src``
    g_mean = None  # grey level of the mean of y
    w0, w1, w2 = _GRAY
    n = x.shape[-2] * x.shape[-1]
    for k in (int(o) for o in jitter[1]) if jitter is not None else ():
        f = float(jitter[0][k])
        if k == 1:
            if g_mean is None:
                s0, s1, s2 = planes.rgb[src].sum(dim=1).tolist()
                g_mean = (w0 * s0 + w1 * s1 + w2 * s2) / n
            b = f * b + (1 - f) * ((a + c) * g_mean + b)
            a, c = f * a, f * c
        elif k == 2:  # grey(a y + c grey(y) + b) = (a + c) grey(y) + b
            a, c = f * a, f * c + (1 - f) * (a + c)
        else:
            a, c, b = f * a, f * c, f * b
        if f > 1:  # the result can leave 0..255: apply it and clamp, as the op does
            rows = _rows(a, c, (b, b, b), (1.0, 1.0, 1.0), (0, 1, 2))
            planes.affine(rows, src, planes.rgb[1 - src]).clamp_(0, 255)
            src, a, c, b, g_mean = 1 - src, 1.0, 0.0, 0.0, None
    bias = tuple(b - m for m in mean)
    rows = _rows(a, c, bias, scale, (2, 1, 0) if bgr else (0, 1, 2))
    direct = out.dtype == planes.dtype and out.is_contiguous()
    res = planes.affine(rows, src, out.view(3, n) if direct else planes.rgb[1 - src])
    if not direct:
        out.copy_(res.view(out.shape))
    return out


def _pool_refs(pool: list, i: int) -> int:
    return sys.getrefcount(pool[i])


_POOL_REFS = _pool_refs([object()], 0)  # the count of an object that only a list refers to


def _unreferenced(pool: list[torch.UntypedStorage], i: int) -> bool:
    """True when only ``pool`` refers to the storage ``pool[i]``: no tensor or view uses it (its use
    count is the pool's 1), no Python reference to the storage object exists besides the list's (a
    caller's ``untyped_storage()`` is this same object), and no other process maps it."""
    if _pool_refs(pool, i) != _POOL_REFS:
        return False
    return _storage_use_count(pool[i]._cdata) == 1 and not pool[i].is_shared()


def _rows(a: float, c: float, bias: tuple, scale: tuple, channels: tuple) -> list[float]:
    """Row-major (3, 4) matrix of ``scale * (a * y + c * grey(y) + bias)`` for output ``channels``."""
    rows = []
    for ch in channels:
        s = scale[ch]
        rows += [s * (c * w + (a if j == ch else 0.0)) for j, w in enumerate(_GRAY)] + [s * bias[ch]]
    return rows


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
        self._pool: list[torch.UntypedStorage] = []
        self._bufs: WorkPlanes | None = None

    def __call__(self, batch: AugBatch) -> torch.Tensor:
        params = batch.params.to(self.device, non_blocking=True)
        if isinstance(batch.images, list):
            host = batch.params if batch.params.device.type == "cpu" else batch.params.cpu()
            decoded = decode_batch(batch.images, self.device)
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
        """An uninitialised output batch; on a CPU, a pooled buffer that nothing refers to any more.

        Writing a freshly allocated 38 MB batch page-faults on every 4 KB page, which cost as much as
        the whole jitter + normalisation arithmetic here; so up to ``_POOL_SIZE`` CPU batches are kept
        and reused once no tensor, view, array or storage object outside the pool refers to them.
        """
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.device.type != "cpu" or _storage_use_count is None:
            return torch.empty(shape, dtype=self.out_dtype, device=self.device, memory_format=fmt)
        stride = torch.empty(shape, device="meta", memory_format=fmt).stride()
        nbytes = math.prod(shape) * self.out_dtype.itemsize
        for i in range(len(self._pool)):
            if self._pool[i].nbytes() == nbytes and _unreferenced(self._pool, i):
                return torch.empty(0, dtype=self.out_dtype).set_(self._pool[i], 0, shape, stride)
        out = torch.empty(shape, dtype=self.out_dtype, memory_format=fmt)
        self._pool = [*self._pool, out.untyped_storage()][-_POOL_SIZE:]
        return out

    def _planes(self, height: int, width: int) -> WorkPlanes:
        """The CPU stage's work buffers, kept between batches."""
        p = self._bufs
        if p is None or p.shape != (height, width) or p.dtype != self.compute_dtype:
            self._bufs = p = WorkPlanes(height, width, self.compute_dtype)
        return p

    def __getstate__(self) -> dict:
        """Pickle without the buffers (they are caches)."""
        return {**self.__dict__, "_pool": [], "_bufs": None}

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
                t.record_stream(torch.cuda.current_stream(self.device))
            pending = ready
        if pending is not None:
            yield pending
