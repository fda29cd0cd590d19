"""Where Meta-ACON-C's forward+backward time goes on the CPU, each C++ kernel alone, beside nn.SiLU's.

For each shape, in interleaved rounds: the forward+backward of nn.SiLU, ACON-C and Meta-ACON-C modules (as
``bench_activation.py`` times them), and every kernel call of the one-op Meta-ACON path alone on warm data:
the spatial mean with the β network, the ACON-C forward and backward with a per-sample β, and the β
network's backward with the mean-gradient pass over dx; ATen's SiLU kernels for comparison. The summary
line gives the kernels' sum (a floor for the module, which adds autograd's and Python's work) as a ratio
to the SiLU module, and the full-tensor passes each makes (Meta-ACON 8: x twice and y forward, dy, x, dx
and dx again backward; SiLU 5), which set the ratio when the tensors do not fit in the caches.

    python scripts/bench_meta_parts.py --threads 1                 # all shapes of bench_activation.py
    python scripts/bench_meta_parts.py --threads 1 --shapes 7,7    # the 7x7 shapes
"""

from __future__ import annotations

import argparse
import functools
import sys
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
    interleaved_rounds,
    malloc_note,
    require_native,
    run_script,
    select_shapes,
)
from acon.fused import meta_native, native  # noqa: E402

MODULES = ("SiLU", "ACON-C", "Meta-ACON")


def meta_kernel_calls(meta: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """name -> zero-argument call of each kernel the one-op Meta-ACON path runs, on its own buffers."""
    xd = x.detach()
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    params = meta_native.served_params(meta, xd)
    if params is None:
        raise SystemExit("bench_meta_parts: the C++ Meta-ACON kernels do not serve this input")
    k = meta_native._kernels(native.library())
    h = params[0].shape[0]
    p32 = meta_native._fp32(params)
    net_args, batch, _ = meta_native._net_args(meta, p32, n)
    saved, beta = torch.empty(k["saved_floats"](n, c, h)), torch.empty(n, c, 1, 1)
    p1, p2 = meta.p1.detach(), meta.p2.detach()
    grad_args, grads = meta_native._net_grad_args(p32, batch)
    state = {"grads": grads}  # the arrays grad_args points into: held as long as the calls

    def mean_and_net() -> None:
        k[("fwd", x.dtype)](
            xd.data_ptr(), 0, beta.data_ptr(), saved.data_ptr(), *net_args, n, c, s, h, 1
        )  # fmt: skip

    def acon_backward() -> None:
        state["dx"], _, _, state["dbeta"] = native.backward(dy, xd, p1, p2, beta)

    def net_backward_and_mean_grad() -> None:
        k[("bwd", x.dtype)](
            state["dx"].data_ptr(), 0, state["dbeta"].data_ptr(), beta.data_ptr(), saved.data_ptr(),
            *grad_args, n, c, s, h, 1,
        )  # fmt: skip

    mean_and_net()
    acon_backward()
    return {
        "Meta: spatial mean + β network": mean_and_net,
        "Meta: ACON-C forward kernel, β per sample": lambda: native.forward(xd, p1, p2, beta),
        "Meta: ACON-C backward kernel, β per sample": acon_backward,
        "Meta: β-network backward + mean-gradient pass": net_backward_and_mean_grad,
    }


def bench_shape(shape: tuple, repeats: int) -> list[tuple[str, float]]:
    """(row name, median ms) of every module and kernel row, timed in interleaved rounds."""
    torch.manual_seed(0)
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    c = shape[1]
    silu, acon, meta = nn.SiLU(), AconC(c, impl="fused"), MetaAconC(c, impl="fused")
    xd = x.detach()
    acon_p = [t.detach() for t in (acon.p1, acon.p2, acon.beta)]
    calls = {
        "SiLU": functools.partial(fwd_bwd, silu, x, dy),
        "ACON-C": functools.partial(fwd_bwd, acon, x, dy),
        "Meta-ACON": functools.partial(fwd_bwd, meta, x, dy),
        "SiLU: forward kernel": lambda: torch.ops.aten.silu(xd),
        "SiLU: backward kernel": lambda: torch.ops.aten.silu_backward(dy, xd),
        "ACON-C: forward kernel": lambda: native.forward(xd, *acon_p),
        "ACON-C: backward kernel": lambda: native.backward(dy, xd, *acon_p),
        **meta_kernel_calls(meta, x, dy),
    }
    # each timed call right after an untimed one: the row's own data warm, as for a kernel inside a network
    med = interleaved_rounds(calls, repeats, before=lambda fn: fn(), warmup=3)
    return [(name, sec * 1e3) for name, sec in med.items()]


def summary(rows: dict[str, float]) -> str:
    """The Meta-ACON kernels' sum and its ratio to the SiLU module, and each module's ratio."""
    meta_kernels = sum(ms for name, ms in rows.items() if name.startswith("Meta:"))
    silu = rows["SiLU"]
    return (
        f"Meta-ACON kernels alone {meta_kernels:.3f} ms = {meta_kernels / silu:.2f}× the SiLU module; "
        f"modules: ACON-C {rows['ACON-C'] / silu:.2f}×, Meta-ACON {rows['Meta-ACON'] / silu:.2f}×; "
        "full-tensor passes: Meta-ACON 8, SiLU 5"
    )


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print a markdown table and return it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    add_shapes_arg(ap)
    add_run_args(ap)
    args = ap.parse_args(argv)
    apply_run_args(args)
    require_native(ap)
    names = select_shapes(ap, ACTIVATION_SHAPES, args.shapes)
    lines = [
        f"# bench_meta_parts: cpu, fp32, {torch.get_num_threads()} CPU threads, median of {args.repeats} "
        f"interleaved rounds, {malloc_note()}",
        "",
        "| shape | module or kernel | ms | × SiLU module |",
        "|---|---|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name in names:
        rows = dict(bench_shape(ACTIVATION_SHAPES[name], args.repeats))
        for row, ms in rows.items():
            add_row(lines, f"| {name} | {row} | {ms:.3f} | {ms / rows['SiLU']:.2f} |")
        add_row(lines, f"| {name} | {summary(rows)} | | |")
    return finish_table(lines, args.out)


if __name__ == "__main__":
    run_script(main)
