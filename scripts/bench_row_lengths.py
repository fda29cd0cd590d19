"""ACON-C's C++ CPU kernels alone on rows of S values, beside ATen's SiLU kernels on the same number of values.

Every row length S gets a contiguous (N, C, S) tensor of about the same number of values (N = total // (C·S)),
so the time per value shows what a row costs: its parameters and sums, and, where S is not a multiple of the
vector width, its tail (the last S mod width values, gathered from 16 rows at a time on AVX-512). The S of the
7×7 stages (49 = 3·16 + 1) is where ACON-C alone misses nn.SiLU's time; S = 48 is the same rows without the
tail. Kernel calls on warm data (``acon.fused.native.run_forward``/``run_backward``), in interleaved rounds,
fastest round; the walker column says which row walker serves each kernel (``acon.fused.native.aligned_rows``).

    python scripts/bench_row_lengths.py --threads 1
    python scripts/bench_row_lengths.py --threads 1 --lengths 48,49,50 --channels 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acon.bench import (  # noqa: E402
    add_row,
    add_run_args,
    apply_run_args,
    finish_table,
    interleaved_rounds,
    malloc_note,
    require_native,
    run_script,
)
from acon.fused import native  # noqa: E402

DEFAULT_LENGTHS = "32,48,49,50,64,96,196,784"


def parse_lengths(ap: argparse.ArgumentParser, text: str) -> list[int]:
    """``--lengths`` as positive integers, or a usage error naming the bad value."""
    try:
        lengths = [int(v) for v in text.split(",")]
    except ValueError:
        ap.error(f"--lengths: {text!r} is not a comma-separated list of integers")
    if any(s < 1 for s in lengths):
        ap.error(f"--lengths: every row length must be at least 1, got {text!r}")
    return lengths


def kernel_calls(s: int, channels: int, total: int) -> tuple[dict, int]:
    """({"fwd": call, "bwd": call} on an (N, C, S) tensor of about ``total`` values, its value count)."""
    n = max(1, total // (channels * s))
    x = torch.randn(n, channels, s)
    dy = torch.randn_like(x)
    p1, p2 = torch.randn(1, channels, 1), torch.randn(1, channels, 1)
    beta = torch.rand(1, channels, 1) + 0.5
    plan = native.plan(x, beta)
    calls = {
        "fwd": lambda: native.run_forward(plan, x, p1, p2, beta),
        "bwd": lambda: native.run_backward(plan, dy, x, p1, p2, beta),
    }
    return calls, x.numel()


def silu_calls(total: int) -> dict:
    """ATen's SiLU forward and backward kernels on ``total`` contiguous values."""
    x = torch.randn(total)
    dy = torch.randn_like(x)
    return {"fwd": lambda: torch.ops.aten.silu(x), "bwd": lambda: torch.ops.aten.silu_backward(dy, x)}


def fastest(calls: dict, repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` rounds per call, seconds; each timed call follows an untimed one (warm data)."""
    return interleaved_rounds(calls, repeats, before=lambda fn: fn(), stat=min)


def walker(s: int) -> str:
    """Which walker serves fp32 rows of ``s`` values: forward kernel / backward kernel."""
    name = {True: "aligned", False: "row"}
    return "/".join(name[native.aligned_rows(s, torch.float32, b)] for b in (False, True))


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print a markdown table and return it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"row lengths S (default {DEFAULT_LENGTHS})")
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument(
        "--values", type=int, default=32 * 512 * 49, help="values per tensor (default [32,512,7,7])"
    )
    ap.add_argument("--repeats", type=int, default=25)
    add_run_args(ap)
    args = ap.parse_args(argv)
    lengths = parse_lengths(ap, args.lengths)
    if args.channels < 1 or args.values < args.channels * max(lengths):
        ap.error(
            f"--channels {args.channels} --values {args.values}: need channels >= 1 and values >= channels·S"
        )
    apply_run_args(args)
    require_native(ap)
    lines = [
        f"# bench_row_lengths: cpu, fp32, {torch.get_num_threads()} CPU threads, {native.vector_width()}-lane "
        f"kernels, fastest of {args.repeats} rounds, about {args.values:,} values per tensor, {malloc_note()}",
        "",
        "| S | rows | walker fwd/bwd | fwd ns/value | bwd ns/value | fwd+bwd × SiLU kernels |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    silu = fastest(silu_calls(args.values), args.repeats)
    silu_ns = {k: v / args.values * 1e9 for k, v in silu.items()}
    for s in lengths:
        calls, values = kernel_calls(s, args.channels, args.values)
        ns = {k: v / values * 1e9 for k, v in fastest(calls, args.repeats).items()}
        ratio = (ns["fwd"] + ns["bwd"]) / (silu_ns["fwd"] + silu_ns["bwd"])
        add_row(
            lines,
            f"| {s} | {values // s:,} | {walker(s)} | {ns['fwd']:.3f} | {ns['bwd']:.3f} | {ratio:.2f} |",
        )
    add_row(lines, f"| SiLU (ATen) | | | {silu_ns['fwd']:.3f} | {silu_ns['bwd']:.3f} | 1.00 |")
    return finish_table(lines, args.out)


if __name__ == "__main__":
    run_script(main)
