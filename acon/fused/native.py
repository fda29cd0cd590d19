"""ACON-C CPU kernels in C++ (``acon_cpu.cpp``), built once per machine with the system compiler.

The source uses portable compiler vector extensions (one native vector per chunk: 16 floats with AVX-512,
8 with AVX2, 4 otherwise, whatever ``-march=native`` gives) and OpenMP. It is compiled on first use into a cache directory
(``$ACON_KERNEL_CACHE``, default ``~/.cache/acon-suite/kernels``), keyed by the source, the compiler and the
CPU, and loaded with ``ctypes``: no build step for the user, and no per-call tracing or guards. Serves fp32
and bf16 tensors (N, C, ...), contiguous or channels-last (the "ncs" and "nsc" layouts of
``acon.fused.layout``), straight from their memory: no views or copies. Other dtypes use the Inductor or
eager formulas of ``acon.fused.cpu``.

NaN and ±Inf propagate as in those formulas (the convention against the paper form is in
``acon.fused.cpu``'s docstring): the clamps of the kernels' e^-z keep a NaN argument, σ is exactly 0 at
-∞ and σ' exactly 0 at ±∞, and lanes past the end of the data never reach the parameter gradients.

The same library holds the single-pass BatchNorm → ACON-C row kernels of ``acon.fused.bn_act``
(``bn_acon_cpu.h``; called through ``acon.fused.bn_native``) for contiguous fp32/bf16 x whose spatial size
holds at least one vector.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from acon.fused.layout import NCS, layout_of

SOURCE = Path(__file__).with_name("acon_cpu.cpp")
# Included by SOURCE: part of the build key (meta_net.h and meta_rows.h: acon.fused.meta_native's kernels).
_HEADER_NAMES = (
    "acon_math.h",
    "acon_rows.h",
    "acon_rows_aligned.h",
    "bn_acon_cpu.h",
    "meta_net.h",
    "meta_rows.h",
)
HEADERS = tuple(Path(__file__).with_name(h) for h in _HEADER_NAMES)
ABI_VERSION = 5
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_BASE_FLAGS = [
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=fast",
]
# Tried in order: the first flag set the compiler accepts is used.
_FLAG_SETS = [["-march=native", "-fopenmp"], ["-mcpu=native", "-fopenmp"], ["-fopenmp"], []]


def cache_dir() -> Path:
    """Where built kernels are kept (``$ACON_KERNEL_CACHE`` or ``~/.cache/acon-suite/kernels``)."""
    return Path(os.environ.get("ACON_KERNEL_CACHE") or Path.home() / ".cache" / "acon-suite" / "kernels")


def compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else ``g++``, else ``c++``; ``None`` when none is found."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def extra_flags() -> list[str]:
    """Additional compiler flags from ``$ACON_KERNEL_CFLAGS`` (e.g. ``-mno-avx512f`` to build narrower)."""
    return os.environ.get("ACON_KERNEL_CFLAGS", "").split()


def _compile(cxx: str, out: Path) -> list[str]:
    """Build ``out`` with the first accepted flag set; returns the flags, raises with the last error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    err = ""
    for extra in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp", dir=out.parent)
        os.close(fd)
        cmd = [cxx, *_BASE_FLAGS, *extra, *extra_flags(), str(SOURCE), "-o", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            res, err = None, str(e)
        if res is not None and res.returncode == 0:
            os.replace(tmp, out)  # atomic: concurrent builders (DDP ranks) never see a partial file
            return extra
        err = err if res is None else res.stderr[-2000:]
        Path(tmp).unlink(missing_ok=True)
    raise RuntimeError(f"acon.fused.native: could not compile {SOURCE} with {cxx}:\n{err}")


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for layout in ("ncs", "nsc"):
        for dt in DTYPES.values():
            getattr(lib, f"acon_fwd_{layout}_{dt}").argtypes = [ptr] * 5 + [i64, i64, i64, i32, i64, i32]
            getattr(lib, f"acon_bwd_{layout}_{dt}").argtypes = [ptr] * 9 + [i64, i64, i64, i32, i64, i32]
    for dt in DTYPES.values():
        getattr(lib, f"bn_moments_ncs_{dt}").argtypes = [ptr] * 4 + [i64, i64, i64, i64, i32]
        getattr(lib, f"bn_acon_fwd_ncs_{dt}").argtypes = [ptr] * 7 + [i64, i64, i64, i32, i64, i32]
        getattr(lib, f"bn_acon_bwd_ncs_{dt}").argtypes = [ptr] * 15 + [i64, i64, i64, i32, i64, i32]
        getattr(lib, f"bn_input_grad_ncs_{dt}").argtypes = [ptr] * 7 + [i64, i64, i64, i64, i32]
    lib.bn_finish_stats.argtypes = [ptr] * 4 + [ctypes.c_double] * 3 + [ptr] * 3 + [i64]
    lib.acon_aligned_rows.argtypes = [i64, i32, i32]
    lib.acon_aligned_rows.restype = i32
    lib.acon_abi_version.restype = i32
    lib.acon_vector_width.restype = i32


def build(force: bool = False) -> Path:
    """Compile the kernels for this machine if needed (cached) and return the library's path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("acon.fused.native: no C++ compiler found (set $CXX or install g++)")
    key = hashlib.sha256(
        b"\0".join(
            x.encode()
            for x in (
                SOURCE.read_text(),
                *(h.read_text() for h in HEADERS),
                _version(cxx),
                _cpu_id(),
                " ".join(_BASE_FLAGS + extra_flags()),
            )
        )
    ).hexdigest()[:20]
    out = cache_dir() / f"acon_cpu_{key}.so"
    if force or not out.exists():
        _compile(cxx, out)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; ``None`` (with one warning) if that fails."""
    if os.environ.get("ACON_FUSED_NO_NATIVE", "0") == "1":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        _declare(lib)
        if lib.acon_abi_version() != ABI_VERSION:
            raise RuntimeError(f"ABI {lib.acon_abi_version()} != {ABI_VERSION}")
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(
            f"acon.fused: C++ CPU kernels unavailable ({e}); using the torch formulas", stacklevel=2
        )
        return None
    return lib


def available() -> bool:
    """Whether the C++ kernels are built and loaded (builds them on the first call)."""
    return library() is not None


def vector_width() -> int | None:
    """Floats per vector chunk of the loaded kernels (16: AVX-512, 8: AVX/AVX2, 4: SSE/NEON), or ``None``."""
    lib = library()
    return None if lib is None else int(lib.acon_vector_width())


def aligned_rows(s: int, dtype: torch.dtype, backward: bool) -> bool:
    """Whether contiguous rows of ``s`` values take the kernels' aligned walker (``acon_rows_aligned.h``), whose
    results do not depend on the thread count, in this build's ``dtype`` forward or backward kernel."""
    lib = library()
    return lib is not None and bool(lib.acon_aligned_rows(s, int(dtype == torch.bfloat16), int(backward)))


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels serve this tensor's dtype (fp32, bf16) on the CPU."""
    return x.device.type == "cpu" and x.dtype in DTYPES


def _flat32(p: torch.Tensor) -> torch.Tensor:
    """``p`` as contiguous fp32 memory (itself when it already is: parameters usually are)."""
    return p if p.dtype == torch.float32 and p.is_contiguous() else p.float().contiguous()


def _blocks(layout: str, n: int, c: int, s: int, threads: int) -> int:
    """Work blocks: rows split into a few blocks per thread ("ncs"), or per sample split along S ("nsc")."""
    if layout == NCS:
        return max(1, min(n * c, 4 * threads))
    return max(1, min(s, -(-threads // n)))


@functools.cache
def _entry(lib: ctypes.CDLL, kind: str, layout: str, dtype: torch.dtype):
    return getattr(lib, f"acon_{kind}_{layout}_{DTYPES[dtype]}")


class Plan(NamedTuple):
    """Everything a kernel call needs besides the tensors' memory; depends only on x's geometry and dtype, β's
    size and the thread count, so it is computed once per such key (:func:`plan`)."""

    layout: str
    n: int
    c: int
    s: int
    per_sample: bool
    blocks: int
    threads: int
    fwd: object  # the ctypes kernels for x's layout and dtype
    bwd: object


_PLANS: dict[tuple, Plan] = {}
_PLANS_MAX = 512  # distinct geometries kept (a model has a few dozen); the cache is cleared past this


def plan(x: torch.Tensor, beta: torch.Tensor) -> Plan:
    """The kernels' call plan for ``x`` and ``β``, cached per geometry; raises for an x that is neither
    contiguous nor channels-last (checked once per geometry: strides are part of the key)."""
    threads, lib = torch.get_num_threads(), library()
    # tuple(shape): Size's == is slow; lib: tests rebuild the library at other widths
    key = (tuple(x.shape), x.stride(), x.dtype, beta.numel(), threads, lib)
    found = _PLANS.get(key)
    if found is None:
        layout = layout_of(x)
        if layout is None:
            raise ValueError(
                f"acon.fused.native: x must be contiguous or channels-last, got strides {x.stride()}"
            )
        n, c = x.shape[0], x.shape[1]
        s = x.numel() // (n * c) if n * c else 0
        blocks = _blocks(layout, n, c, s, threads)
        fwd, bwd = _entry(lib, "fwd", layout, x.dtype), _entry(lib, "bwd", layout, x.dtype)
        found = Plan(layout, n, c, s, beta.numel() > c, blocks, threads, fwd, bwd)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = found
    return found


def forward(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """y for a dense (contiguous or channels-last) x (N, C, ...), with x's strides; p1, p2 hold C values and
    β C or N·C (per sample), in any shape."""
    return run_forward(plan(x, beta), x, p1, p2, beta)


def run_forward(
    k: Plan, x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """:func:`forward` on the plan ``k`` of x and β (:func:`plan`)."""
    y = torch.empty_like(x)
    q1, q2, qb = _flat32(p1), _flat32(p2), _flat32(beta)  # held until the call returns (may be fp32 copies)
    k.fwd(
        x.data_ptr(), y.data_ptr(), q1.data_ptr(), q2.data_ptr(), qb.data_ptr(),
        k.n, k.c, k.s, k.per_sample, k.blocks, k.threads,
    )  # fmt: skip
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor):
    """(dx with x's strides, and the fp32 gradients of p1, p2 and β, each in that parameter's shape);
    dy must have x's shape and strides."""
    k = plan(x, beta)
    if dy.stride() != x.stride() or tuple(dy.shape) != tuple(x.shape):  # tuples: Size == is slow
        raise ValueError(
            f"acon.fused.native: dy must have x's shape and strides {tuple(x.shape)}, {x.stride()}; "
            f"got {tuple(dy.shape)}, {dy.stride()}"
        )
    return run_backward(k, dy, x, p1, p2, beta)


def run_backward(
    k: Plan, dy: torch.Tensor, x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor
):
    """:func:`backward` on the plan ``k`` of x and β, for a dy known to have x's shape and strides."""
    dx = torch.empty_like(x)
    g1, g2, gb = _grad_buffer(p1), _grad_buffer(p2), _grad_buffer(beta)
    q1, q2, qb = _flat32(p1), _flat32(p2), _flat32(beta)  # held until the call returns (may be fp32 copies)
    k.bwd(
        dy.data_ptr(), x.data_ptr(), dx.data_ptr(), g1.data_ptr(), g2.data_ptr(), gb.data_ptr(),
        q1.data_ptr(), q2.data_ptr(), qb.data_ptr(),
        k.n, k.c, k.s, k.per_sample, k.blocks, k.threads,
    )  # fmt: skip
    return dx, g1, g2, gb


def _grad_buffer(p: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous fp32 tensor shaped like ``p`` (``empty_like`` when ``p`` already is one:
    a few times cheaper than ``empty`` from a shape)."""
    if p.dtype == torch.float32 and p.is_contiguous():
        return torch.empty_like(p)
    return torch.empty(p.shape)
