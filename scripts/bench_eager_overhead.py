"""Where eager ACON-C's forward+backward time goes beside nn.SiLU's on the CPU: kernels, autograd, Python.

For each shape, in interleaved rounds, each timed call follows an untimed reference ACON-C forward+backward
(as in ``bench_activation.py``'s rounds, which leave the caches cold) and is one of:

- the SiLU and ACON-C modules' forward+backward, as ``bench_activation.py`` times them;
- the ACON-C module with p1, p2 and β frozen (no parameter gradients to return and accumulate);
- ACON-C through a C++ autograd function around the same kernel calls (``scripts/cpp/acon_autograd_op.cpp``,
  built with ``torch.utils.cpp_extension`` on first use, about 30 s; ``--no-cpp`` skips it): what moving the
  autograd wrapper out of Python would save;
- the kernels alone, no autograd: ATen's ``silu``/``silu_backward`` and ACON-C's C++ forward/backward.

The summary line per shape gives each module's time outside its kernels. Medians of the rounds.

    python scripts/bench_eager_overhead.py --threads 1                   # the 7x7 shapes
    python scripts/bench_eager_overhead.py --threads 1 --shapes 14,14 --no-cpp
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acon import AconC  # noqa: E402
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
from acon.fused import check_shapes, native  # noqa: E402
from acon.fused.ops import native_plan  # noqa: E402

CPP_SOURCE = Path(__file__).with_name("cpp") / "acon_autograd_op.cpp"


def build_cpp_op():
    """The compiled ``acon_autograd_op`` extension module (cached under the kernels' cache directory)."""
    from torch.utils import cpp_extension

    build_dir = native.cache_dir() / "acon_autograd_op"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        "acon_autograd_op", [str(CPP_SOURCE)], extra_cflags=["-O2"], build_directory=str(build_dir)
    )


class CppAconC(AconC):
    """:class:`acon.AconC` whose forward calls the C++ autograd function of ``scripts/cpp`` (fp32 CPU x)."""

    def __init__(self, channels: int, op) -> None:
        super().__init__(channels, impl="fused")
        self.op, self.plan_args = op, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = native_plan(x, self.p1, self.p2, self.beta, check_shapes)
        if self.plan_args is None:  # one geometry per benchmark row
            kernels = [ctypes.cast(k, ctypes.c_void_p).value for k in (plan.fwd, plan.bwd)]
            self.plan_args = [
                *kernels,
                plan.n,
                plan.c,
                plan.s,
                int(plan.per_sample),
                plan.blocks,
                plan.threads,
            ]
        return self.op.acon_c(x, self.p1, self.p2, self.beta, self.plan_args)


def check_same(a: nn.Module, b: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    """Raise unless modules ``a`` and ``b`` give the same output and gradients (bit for bit) on x."""
    grads = []
    for m in (a, b):
        x.grad = None
        m.zero_grad(set_to_none=True)
        y = m(x)
        y.backward(dy)
        grads.append([y.detach(), x.grad, *(p.grad for p in m.parameters())])
    if not all(torch.equal(u, v) for u, v in zip(*grads, strict=True)):
        raise RuntimeError("the C++ autograd op does not reproduce the AconC module's results")


def calls(shape: tuple[int, ...], cpp_op) -> tuple[dict, object]:
    """(the timed calls by row name, the untimed reference ACON-C forward+backward) for ``shape``."""
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn_like(x)
    c = shape[1]
    silu, acon, frozen = nn.SiLU(), AconC(c, impl="fused"), AconC(c, impl="fused")
    frozen.load_state_dict(acon.state_dict())
    frozen.requires_grad_(False)
    xd = x.detach()
    p1, p2, beta = (t.detach() for t in (acon.p1, acon.p2, acon.beta))
    plan = native_plan(xd, p1, p2, beta, check_shapes)
    rows = {
        "SiLU module": lambda: fwd_bwd(silu, x, dy),
        "ACON-C module": lambda: fwd_bwd(acon, x, dy),
        "ACON-C module, p1/p2/β frozen": lambda: fwd_bwd(frozen, x, dy),
    }
    if cpp_op is not None:
        cpp = CppAconC(c, cpp_op)
        cpp.load_state_dict(acon.state_dict())
        check_same(acon, cpp, x, dy)
        rows["ACON-C, C++ autograd op"] = lambda: fwd_bwd(cpp, x, dy)
    rows["SiLU kernels alone"] = lambda: (torch.ops.aten.silu(xd), torch.ops.aten.silu_backward(dy, xd))
    rows["ACON-C kernels alone"] = lambda: (
        native.run_forward(plan, xd, p1, p2, beta),
        native.run_backward(plan, dy, xd, p1, p2, beta),
    )
    reference = AconC(c, impl="reference")
    return rows, lambda: fwd_bwd(reference, x, dy)


def summary(med: dict[str, float]) -> str:
    """Each module's time outside its kernels, µs."""
    pairs = {
        "SiLU": ("SiLU module", "SiLU kernels alone"),
        "ACON-C": ("ACON-C module", "ACON-C kernels alone"),
        "ACON-C through the C++ autograd op": ("ACON-C, C++ autograd op", "ACON-C kernels alone"),
    }
    parts = [f"{label} {(med[m] - med[k]) * 1e6:.0f} µs" for label, (m, k) in pairs.items() if m in med]
    return "outside the kernels: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print a markdown table and return it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shapes_arg(ap)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-cpp", action="store_true", help="skip the C++ autograd op (no extension build)")
    add_run_args(ap)
    args = ap.parse_args(argv)
    names = select_shapes(ap, ACTIVATION_SHAPES, args.shapes or ["7,7"])
    if args.repeats < 1 or args.warmup < 0:
        ap.error(f"--repeats {args.repeats} --warmup {args.warmup}: need repeats >= 1 and warmup >= 0")
    apply_run_args(args)
    require_native(ap)
    cpp_op = None if args.no_cpp else build_cpp_op()
    lines = [
        f"# bench_eager_overhead: cpu, fp32, {torch.get_num_threads()} CPU threads, {native.vector_width()}-lane "
        f"kernels, median of {args.repeats} interleaved rounds after a reference ACON-C call each, {malloc_note()}",
        "",
        "| shape | row | fwd+bwd ms | × SiLU module |",
        "|---|---|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name in names:
        rows, churn = calls(ACTIVATION_SHAPES[name], cpp_op)
        churn()
        med = interleaved_rounds(
            rows, args.repeats, before=lambda fn, churn=churn: churn(), warmup=args.warmup
        )
        for row, sec in med.items():
            add_row(lines, f"| {name} | {row} | {sec * 1e3:.3f} | {sec / med['SiLU module']:.2f} |")
        add_row(lines, f"| {name} | {summary(med)} | | |")
    return finish_table(lines, args.out)


if __name__ == "__main__":
    run_script(main)
