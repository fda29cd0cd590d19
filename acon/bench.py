"""What the benchmark scripts share: run options, a steady allocator, device sync, writing the table.

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

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The activation benchmarks' input shapes: ShuffleNetV2 1.0x stages at batch 64, ResNet-50 stages at batch 32.
ACTIVATION_SHAPES = {
    "shufflenetv2 s2 [64,116,28,28]": (64, 116, 28, 28),
    "shufflenetv2 s3 [64,232,14,14]": (64, 232, 14, 14),
    "shufflenetv2 s4 [64,464,7,7]": (64, 464, 7, 7),
    "resnet50 s1 [32,64,56,56]": (32, 64, 56, 56),
    "resnet50 s2 [32,128,28,28]": (32, 128, 28, 28),
    "resnet50 s3 [32,256,14,14]": (32, 256, 14, 14),
    "resnet50 s4 [32,512,7,7]": (32, 512, 7, 7),
}

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


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """Options every benchmark script takes: ``--threads``, ``--default-malloc`` and ``--out``."""
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's default malloc (see acon.bench)"
    )
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")


def add_shapes_arg(ap: argparse.ArgumentParser) -> None:
    """``--shapes TEXT ...``: the activation benchmarks' filter on :data:`ACTIVATION_SHAPES` names."""
    ap.add_argument("--shapes", nargs="+", metavar="TEXT", help="only shapes whose name contains a TEXT")


def select_shapes(ap: argparse.ArgumentParser, names, texts: list[str] | None) -> tuple[str, ...]:
    """The ``names`` that contain one of ``texts`` (all of them without ``--shapes``); none: a usage error
    (exit 2) that lists every shape of :data:`ACTIVATION_SHAPES`."""
    if not texts:
        return tuple(names)
    picked = tuple(n for n in names if any(t in n for t in texts))
    if not picked:
        ap.error(f"--shapes {' '.join(texts)} matches none of: {', '.join(ACTIVATION_SHAPES)}")
    return picked


def apply_run_args(args: argparse.Namespace) -> None:
    """Apply the options of :func:`add_run_args` that act on this process (``--threads``)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def sync(device: str) -> None:
    """Wait for queued device work (CUDA), so wall-clock timings cover it."""
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(m: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    """One forward+backward of ``m`` on ``x`` (a leaf whose gradient is dropped first), as the activation
    benchmarks time it."""
    x.grad = None
    m(x).backward(dy)


def interleaved_rounds(
    calls: dict[str, Callable[[], object]],
    repeats: int,
    before: Callable[[Callable[[], object]], object],
    warmup: int = 0,
    stat: Callable[[list[float]], float] = statistics.median,
) -> dict[str, float]:
    """Seconds per call: ``stat`` (median, or min for the fastest round) of ``repeats`` rounds in which every
    call runs once in order, after ``warmup`` untimed calls of each; ``before(fn)`` runs untimed ahead of each
    timed ``fn()`` (``fn`` itself: warm data; another call: the caches it leaves)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            before(fn)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: stat(v) for name, v in times.items()}


def require_native(ap: argparse.ArgumentParser) -> None:
    """A usage error (exit 2) unless the C++ CPU kernels are built and loaded here."""
    from acon.fused import native

    if not native.available():
        ap.error("the C++ kernels are not available here (no compiler, or ACON_FUSED_NO_NATIVE=1)")


def add_row(lines: list[str], line: str) -> None:
    """Append a table row and print it at once (long benchmarks show each row as it is measured)."""
    lines.append(line)
    print(line, flush=True)


def finish_table(lines: list[str], out: Path | None) -> str:
    """The markdown table as text, also written to ``out`` when given (and a line saying where)."""
    text = "\n".join(lines) + "\n"
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"table written to {out}", flush=True)
    return text


def run_script(main) -> None:
    """A benchmark script's entry point: :func:`steady_malloc` unless ``--default-malloc``, then ``main()``."""
    steady_malloc("--default-malloc" not in sys.argv)
    main()
