"""Saved activations of a compiled training step: ACON-C / Meta-ACON traced vs autograd formula vs opaque op.

Under ``torch.compile`` the modules give Inductor the formula in forward and the fused backward kernel in
backward (``acon.fused.traced_acon_c``); this script also runs the alternatives, autograd of the plain
formula and the opaque ``acon::acon_c`` custom op, to show what each keeps. Which tensors a
compiled step keeps for backward is decided by AOTAutograd's min-cut partitioner on the graph after
Inductor's decompositions; this script runs exactly that (Inductor's decomposition table and the
partitioner in its Inductor setting) but skips Inductor's code generation, so a model takes seconds
instead of minutes on a CPU. ``--inductor`` compiles for real. Bytes are distinct storages saved during
the forward pass, parameters excluded (``acon.memory.saved_tensor_bytes``), as a ratio to compiled ReLU.

    python scripts/bench_compile_memory.py                                  # ShuffleNetV2 1.0x, batch 16, 112 px
    python scripts/bench_compile_memory.py --model resnet50 --batch 8 --img 112 --inductor
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import acon.fused  # noqa: E402
from acon.bench import add_row, add_run_args, apply_run_args, finish_table, malloc_note, run_script  # noqa: E402
from acon.fused.layout import dense  # noqa: E402
from acon.fused.traced import formula  # noqa: E402
from acon.memory import saved_tensor_bytes  # noqa: E402
from models import create_model  # noqa: E402

VARIANTS = {  # label -> (activation, act_kwargs, what traced code runs for the fused op)
    "ReLU": ("relu", None, "traced"),
    "ACON-C traced formula": ("acon_c", {"impl": "fused"}, "traced"),
    "ACON-C formula, autograd backward": ("acon_c", {"impl": "fused"}, "autograd"),
    "ACON-C opaque op": ("acon_c", {"impl": "fused"}, "opaque"),
    "Meta-ACON traced formula": ("meta_acon", {"impl": "fused"}, "traced"),
    "Meta-ACON opaque op": ("meta_acon", {"impl": "fused"}, "opaque"),
    "ACON-C paper form": ("acon_c", {"impl": "reference"}, "traced"),
}


def opaque_acon_c(x, p1, p2, beta):
    """The custom op, as traced code once ran it."""
    return acon.fused.acon_c_op(dense(x), p1, p2, beta)


TRACED = {"traced": acon.fused.traced_acon_c, "autograd": formula, "opaque": opaque_acon_c}


def partition_backend():
    """AOTAutograd with Inductor's decompositions and partitioner, graphs run as they are (no codegen)."""
    import torch._inductor.lowering  # noqa: F401 (Inductor's decompositions refer to it)
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def as_is(gm, _):
        return make_boxed_func(gm.forward)

    partition = functools.partial(min_cut_rematerialization_partition, compiler="inductor")
    return aot_autograd(
        fw_compiler=as_is, bw_compiler=as_is, decompositions=select_decomp_table(), partition_fn=partition
    )


def measure(label: str, args, backend) -> tuple[int, int]:
    """(eager, compiled) saved-activation bytes of one training forward of ``label``'s model."""
    act, kw, traced = VARIANTS[label]
    acon.fused.traced_acon_c = TRACED[traced]
    try:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = create_model(args.model, activation=act, num_classes=1000, act_kwargs=kw).train()
        x = torch.randn(args.batch, 3, args.img, args.img)
        compiled = torch.compile(model, backend=backend)
        compiled(x).sum().backward()  # compile forward and backward
        return saved_tensor_bytes(model, lambda: model(x)), saved_tensor_bytes(model, lambda: compiled(x))
    finally:
        acon.fused.traced_acon_c = TRACED["traced"]


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print a markdown table and return it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shufflenetv2_x1_0")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--img", type=int, default=112)
    ap.add_argument("--inductor", action="store_true", help="compile with Inductor (minutes per variant)")
    add_run_args(ap)
    args = ap.parse_args(argv)
    apply_run_args(args)
    backend = "inductor" if args.inductor else partition_backend()
    how = "Inductor" if args.inductor else "Inductor decompositions + min-cut partitioner, no codegen"
    lines = [
        f"# bench_compile_memory: {args.model}, batch {args.batch}, {args.img} px, {how}, {malloc_note()}",
        "",
        "| model | activation | eager saved MiB | × eager ReLU | compiled saved MiB | × compiled ReLU |",
        "|---|---|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    base = None
    for label in VARIANTS:
        eager, compiled = measure(label, args, backend)
        base = base or (eager, compiled)
        add_row(
            lines,
            f"| {args.model} | {label} | {eager / 2**20:.1f} | {eager / base[0]:.2f} "
            f"| {compiled / 2**20:.1f} | {compiled / base[1]:.2f} |",
        )
    return finish_table(lines, args.out)


if __name__ == "__main__":
    run_script(main)
