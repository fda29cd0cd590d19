"""Process setup shared by the benchmark scripts: a steady allocator, so ratios do not depend on luck.

On Linux, glibc's malloc serves large blocks with fresh ``mmap`` pages and gives them back on free, and
whether a given op's output lands in recycled or in fresh memory depends on the allocation history of
the process. Faulting in fresh pages is slow on virtual machines (a few µs per 4 KiB page on the
development VM), which made single rows jump by 2x between runs. :func:`steady_malloc` re-executes the
script with malloc told never to use ``mmap`` and never to trim the heap, and the activation benchmark
prints page faults per call, so a row paying for faults is visible. It changes no result, only noise.
(Some ATen kernels, nn.SiLU among them, still switch between two speeds without any fault; see
``benchmarks/cpu_2026-11-28.md``.)
"""

from __future__ import annotations

import os
import sys

STEADY_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def steady_malloc(enabled: bool = True) -> None:
    """Re-execute this script under :data:`STEADY_MALLOC_ENV` (Linux, once; no-op when already set)."""
    if not enabled or not sys.platform.startswith("linux"):
        return
    if all(os.environ.get(k) == v for k, v in STEADY_MALLOC_ENV.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC_ENV})


def malloc_note() -> str:
    """How this process's malloc is set up, for benchmark headers."""
    steady = all(os.environ.get(k) == v for k, v in STEADY_MALLOC_ENV.items())
    return "steady malloc" if steady else "default malloc"
