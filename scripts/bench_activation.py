"""Forward+backward time and saved-for-backward memory of each activation/implementation vs nn.SiLU.

Shapes come from ShuffleNetV2 1.0x (batch 64) and ResNet-50 stages (batch 32). Every row is timed in
the same run as nn.SiLU on the same tensor, in interleaved rounds; the printed time is the median round
as a ratio to SiLU's median. Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``
(each storage once) relative to the input's bytes. On CUDA the fused kernels' effective bandwidth is also
reported as a percentage of a plain copy's (forward moves 2 tensors, backward 3).

    python scripts/bench_activation.py                      # CPU, fp32, all shapes
    python scripts/bench_activation.py --quick              # two shapes, fewer repeats
    python scripts/bench_activation.py --shapes 7,7         # only the 7x7 shapes
    python scripts/bench_activation.py --device cuda --dtype bf16 --out benchmarks/act.md
    python scripts/bench_activation.py --stat min            # fastest round: robust to preemption on a busy CPU

    # every CPU row at AVX2 width on an AVX-512 machine (C++ kernels, ATen's SiLU, Inductor)
    ACON_KERNEL_CFLAGS=-mno-avx512f ATEN_CPU_CAPABILITY=avx2 \
        python scripts/bench_activation.py --threads 1 --inductor-simdlen 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acon import AconC, MetaAconC  # noqa: E402
from acon.bench import (  # noqa: E402
    ACTIVATION_SHAPES,
    add_row,
    add_run_args,
    add_shapes_arg,
    apply_run_args,
    finish_table,
    fwd_bwd,
    malloc_note,
    run_script,
    select_shapes,
    sync,
)
from acon.fused import cpu as fused_cpu  # noqa: E402
from acon.fused import native as fused_native  # noqa: E402
from acon.memory import saved_tensor_bytes  # noqa: E402

SHAPES = ACTIVATION_SHAPES
QUICK = ("shufflenetv2 s2 [64,116,28,28]", "resnet50 s3 [32,256,14,14]")
MODE_LABEL = {"native": "C++ kernels", "compiled": "Inductor", "eager": "eager formulas"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATS = {"median": statistics.median, "min": min}


def candidates(c: int, device: str) -> dict[str, tuple[nn.Module, str | None]]:
    """name -> (module, CPU execution mode of the fused path or None); on CPU every available mode."""
    rows = {
        "SiLU": (nn.SiLU(), None),
        "ReLU": (nn.ReLU(), None),
        "AconC reference": (AconC(c, impl="reference"), None),
        "AconC fused": (AconC(c, impl="fused"), None),
        "MetaAconC reference": (MetaAconC(c, impl="reference"), None),
        "MetaAconC fused": (MetaAconC(c, impl="fused"), None),
    }
    if device == "cpu":
        default = fused_cpu.default_mode()
        if default == "native" and not fused_native.available():
            default = "compiled"
        for mode in fused_cpu.MODES:
            if mode == default or (mode != "eager" and not fused_cpu.compile_supported()):
                continue
            if mode == "native" and not fused_native.available():
                continue
            rows[f"AconC fused ({MODE_LABEL[mode]})"] = (AconC(c, impl="fused"), mode)
        rows = {(f"{k} ({MODE_LABEL[default]})" if k.endswith("fused") else k): v for k, v in rows.items()}
    return rows


def timing_order(rows: dict) -> list[str]:
    """The rows in the order a round times them: the reference rows churn memory and leave the caches cold
    for the row timed after them, so they go first and ReLU (no ratio is read from it) follows them; SiLU,
    the baseline, and every fused row each follow a light row."""
    heavy = [k for k in rows if "reference" in k]
    light = [k for k in rows if k not in heavy]
    if "ReLU" in light:
        light.remove("ReLU")
        light.insert(0, "ReLU")
    return heavy + light


def saved_bytes(m: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward of ``m(x)`` (parameters excluded)."""
    return saved_tensor_bytes(m, lambda: m(x))


def timed(fn, device: str, inner: int) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_faults(fn, device: str, inner: int) -> tuple[float, float]:
    """(seconds per call, minor page faults per call) of ``fn`` over ``inner`` calls."""
    f0 = minor_faults()
    sec = timed(fn, device, inner)
    return sec, (minor_faults() - f0) / inner


def kernel_bandwidth_rows(x: torch.Tensor, dy: torch.Tensor, args) -> list[tuple]:
    """CUDA: median GB/s of the Triton forward/backward kernels as a fraction of a plain copy's."""
    from acon.fused import triton_kernels

    c = x.shape[1]
    p1, p2 = (torch.randn(1, c, 1, 1, device=x.device, dtype=x.dtype) for _ in range(2))
    beta = torch.ones(1, c, 1, 1, device=x.device, dtype=x.dtype)
    xd, y = x.detach(), torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    cases = {
        "copy": (lambda: y.copy_(xd), 2),
        "fused fwd kernel": (lambda: triton_kernels.forward(xd, p1, p2, beta), 2),
        "fused bwd kernel": (lambda: triton_kernels.backward(dy, xd, p1, p2, beta), 3),
    }
    med = {}
    for name, (fn, _) in cases.items():
        fn()
        med[name] = statistics.median(timed(fn, "cuda", args.inner) for _ in range(args.repeats))
    copy_bw = 2 * nbytes / med["copy"]
    rows = []
    for name, (_, tensors) in cases.items():
        bw = tensors * nbytes / med[name]
        rows.append((f"{name}: {bw / 1e9:.0f} GB/s", med[name] * 1e3, bw / copy_bw, float("nan"), 0.0))
    return rows


def bench_shape(shape, args) -> list[tuple]:
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)
    rows = candidates(shape[1], device)
    for m, _ in rows.values():
        m.to(device=device, dtype=dtype)
    times: dict[str, list[float]] = {k: [] for k in rows}
    faults: dict[str, list[float]] = {k: [] for k in rows}
    for m, mode in rows.values():  # warm-up (includes kernel compiles)
        fused_cpu.set_mode(mode)
        for _ in range(args.warmup):
            fwd_bwd(m, x, dy)
    for _ in range(args.repeats):  # interleaved rounds so machine noise hits every row alike
        for name in timing_order(rows):
            m, mode = rows[name]
            fused_cpu.set_mode(mode)
            sec, flt = timed_faults(lambda m=m: fwd_bwd(m, x, dy), device, args.inner)
            times[name].append(sec)
            faults[name].append(flt)
    fused_cpu.set_mode(None)
    stat = STATS[args.stat]
    base = stat(times["SiLU"])
    nbytes = x.numel() * x.element_size()
    out = []
    for name, (m, mode) in rows.items():
        fused_cpu.set_mode(mode)
        med = stat(times[name])
        flt = stat(faults[name])
        out.append((name, med * 1e3, med / base, saved_bytes(m, x) / nbytes, flt))
    fused_cpu.set_mode(None)
    if device == "cuda":
        out += kernel_bandwidth_rows(x, dy, args)
    return out


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print a markdown table and return it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inner", type=int, default=0, help="calls per timed round (0: 1 on CPU, 20 on CUDA)")
    ap.add_argument("--quick", action="store_true", help="two shapes, 7 repeats")
    ap.add_argument(
        "--stat",
        default="median",
        choices=tuple(STATS),
        help="per row: median round, or fastest round (min; a loaded CPU preempts long rows more often)",
    )
    add_shapes_arg(ap)
    ap.add_argument(
        "--inductor-simdlen", type=int, help="vector width in bits for Inductor's CPU code (e.g. 256: AVX2)"
    )
    add_run_args(ap)
    args = ap.parse_args(argv)
    apply_run_args(args)
    if args.inductor_simdlen:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = args.inductor_simdlen
    args.inner = args.inner or (20 if args.device == "cuda" else 1)
    if args.quick:
        args.repeats = min(args.repeats, 7)
    names = select_shapes(ap, QUICK if args.quick else SHAPES, args.shapes)
    fmt = "channels_last" if args.channels_last else "contiguous"
    lines = [
        f"# bench_activation: {args.device}, {args.dtype}, {fmt}, {torch.get_num_threads()} CPU threads, "
        f"{args.stat} of {args.repeats} interleaved rounds, {malloc_note()}",
        "",
        "| shape | activation / impl | fwd+bwd ms | × SiLU | saved / input | page faults / call |",
        "|---|---|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name in names:
        for row, ms, ratio, saved, flt in bench_shape(SHAPES[name], args):
            if "GB/s" in row:  # CUDA kernel rows: ratio is the fraction of copy bandwidth
                line = f"| {name} | {row} | {ms:.3f} | {100 * ratio:.0f}% of copy | – | – |"
            else:
                line = f"| {name} | {row} | {ms:.2f} | {ratio:.2f} | {saved:.2f} | {flt:.0f} |"
            add_row(lines, line)
    return finish_table(lines, args.out)


if __name__ == "__main__":
    run_script(main)
