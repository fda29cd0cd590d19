"""CPU batch stage of the fast path: colour jitter + normalisation as 3x4 colour matrices, into reused buffers.

On a CPU the per-op passes of :func:`acon.data.gpu.color_jitter_batch` cost about 3x more than composing
the ops on the host and touching the pixels only with a few (3 x 4) matrix products per image
(:func:`jitter_normalize_cpu`). Output batches come from an :class:`OutputPool`, because writing a freshly
allocated batch page-faults on every page.
"""

from __future__ import annotations

import math
import sys

import torch

from acon.data.fast import GRAY_WEIGHTS

__all__ = ["OutputPool", "WorkPlanes", "jitter_normalize_cpu"]

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


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

    Computes what :func:`acon.data.gpu.color_jitter_batch` (bound 255) followed by ``(x - mean) * scale`` computes
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
    w0, w1, w2 = GRAY_WEIGHTS
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


def _rows(a: float, c: float, bias: tuple, scale: tuple, channels: tuple) -> list[float]:
    """Row-major (3, 4) matrix of ``scale * (a * y + c * grey(y) + bias)`` for output ``channels``."""
    rows = []
    for ch in channels:
        s = scale[ch]
        rows += [s * (c * w + (a if j == ch else 0.0)) for j, w in enumerate(GRAY_WEIGHTS)] + [s * bias[ch]]
    return rows


class OutputPool:
    """Up to ``size`` CPU output buffers, each handed out again once nothing outside the pool refers to it.

    Writing a freshly allocated 38 MB batch page-faults on every 4 KB page, which costs as much as the
    whole jitter + normalisation arithmetic; so buffers are kept and reused once no tensor, view, array
    or storage object outside the pool refers to them. Without ``torch._C._storage_Use_Count`` (private)
    every call allocates.
    """

    def __init__(self, size: int = 3) -> None:  # the batch being consumed, the next one, a spare
        self.size = size
        self._storages: list[torch.UntypedStorage] = []

    def __len__(self) -> int:
        return len(self._storages)

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, memory_format: torch.memory_format
    ) -> torch.Tensor:
        """An uninitialised CPU tensor of ``shape``, in a pooled buffer nothing refers to any more if any."""
        if _storage_use_count is None:
            return torch.empty(shape, dtype=dtype, memory_format=memory_format)
        stride = torch.empty(shape, device="meta", memory_format=memory_format).stride()
        nbytes = math.prod(shape) * dtype.itemsize
        for i in range(len(self._storages)):
            if self._storages[i].nbytes() == nbytes and _unreferenced(self._storages, i):
                return torch.empty(0, dtype=dtype).set_(self._storages[i], 0, shape, stride)
        out = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        self._storages = [*self._storages, out.untyped_storage()][-self.size :]
        return out

    def __getstate__(self) -> dict:
        """Pickle empty (buffers are a cache)."""
        return {"size": self.size, "_storages": []}


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
