"""Training-step time and saved-activation memory of ShuffleNetV2 1.0x and ResNet-50 per activation, vs ReLU.

A step is forward, cross-entropy, backward and an SGD update. All variants of one model are timed in
interleaved rounds in the same run; the printed numbers are medians and ratios to ReLU's median.
Saved-activation memory is the sum of distinct storages autograd saves during the forward pass
(``torch.autograd.graph.saved_tensors_hooks``, parameters excluded): what a training step holds after its
forward pass. "BN-fused" variants run every BatchNorm → ACON pair as one op (``acon.fuse_bn_acon``);
"BN-fused multi-pass" ones run that op without its single-pass C++ row kernels (the path channels-last,
fp64 and small maps take; ``acon.fused.bn_act.single_pass(False)``), to compare the two in one run.
With ``--compile`` the "autograd backward" variants trace ACON-C as the plain formula and let autograd
derive its backward (how compiled code ran it before the fused backward kernel served it), for comparison.

    python scripts/bench_train_step.py                          # CPU defaults: batch 8, 112 px
    python scripts/bench_train_step.py --batch 32 --img 224     # the issue's setting
    python scripts/bench_train_step.py --device cuda --amp bf16 --batch 128 --img 224 --out benchmarks/x.md
    python scripts/bench_train_step.py --compile --variants "ReLU,ACON-C fused,Meta-ACON fused"  # vs compiled ReLU
    python scripts/bench_train_step.py --compile --variants "ReLU,ACON-C fused,ACON-C autograd backward"
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import acon.fused  # noqa: E402
from acon.bench import (  # noqa: E402
    add_row,
    add_run_args,
    apply_run_args,
    finish_table,
    malloc_note,
    run_script,
    sync,
)
from acon.fuse_bn import fuse_bn_acon  # noqa: E402
from acon.fused.bn_act import single_pass  # noqa: E402
from acon.fused.traced import formula  # noqa: E402
from acon.memory import saved_tensor_bytes  # noqa: E402
from models import create_model  # noqa: E402

VARIANTS = {  # label -> (activation name, act_kwargs, BatchNorm → ACON pairs fused by acon.fuse_bn_acon)
    "ReLU": ("relu", None, False),
    "ACON-C fused": ("acon_c", {"impl": "fused"}, False),
    "Meta-ACON fused": ("meta_acon", {"impl": "fused"}, False),
    "ACON-C BN-fused": ("acon_c", {"impl": "fused"}, True),
    "Meta-ACON BN-fused": ("meta_acon", {"impl": "fused"}, True),
    "ACON-C reference": ("acon_c", {"impl": "reference"}, False),
    "Meta-ACON reference": ("meta_acon", {"impl": "reference"}, False),
    "ACON-C BN-fused multi-pass": ("acon_c", {"impl": "fused"}, True),
    "Meta-ACON BN-fused multi-pass": ("meta_acon", {"impl": "fused"}, True),
    "ACON-C autograd backward": ("acon_c", {"impl": "fused"}, False),
    "Meta-ACON autograd backward": ("meta_acon", {"impl": "fused"}, False),
}
COMPILE_ONLY = ("ACON-C autograd backward", "Meta-ACON autograd backward")


@contextlib.contextmanager
def traced_as(label: str):
    """Traced code runs ACON-C as ``label`` needs: autograd of the plain formula for the "autograd
    backward" variants, else what ``acon.fused.traced_acon_c`` is (formula forward, fused-kernel backward)."""
    served = acon.fused.traced_acon_c
    if label in COMPILE_ONLY:
        acon.fused.traced_acon_c = formula
    try:
        yield
    finally:
        acon.fused.traced_acon_c = served


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> int:
    """Bytes of distinct non-parameter storages saved for backward during one forward pass."""

    def forward():
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return model(x)

    return saved_tensor_bytes(model, forward)


def step(model, opt, x, y, amp, label: str = "") -> None:
    """One SGD training step (without the BatchNorm + ACON row kernels for "multi-pass" variants)."""
    with single_pass("multi-pass" not in label):
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def bench_model(name: str, variants: list[str], args) -> list[str]:
    dev = args.device
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img, args.img, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    runs = {}
    for label in variants:
        act, kw, fuse_bn = VARIANTS[label]
        torch.manual_seed(0)
        m = create_model(name, activation=act, num_classes=1000, act_kwargs=kw).to(dev, memory_format=fmt)
        m = fuse_bn_acon(m) if fuse_bn else m
        m.train()
        m = torch.compile(m) if args.compile else m  # every variant, ReLU included: ratios to compiled ReLU
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        with traced_as(label):
            for _ in range(args.warmup):  # includes kernel compiles
                step(m, opt, x, y, amp, label)
        runs[label] = (m, opt, [])
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for _ in range(args.steps):
        for label, (m, opt, times) in runs.items():
            with traced_as(label):
                sync(dev)
                t0 = clock()
                step(m, opt, x, y, amp, label)
                sync(dev)
            times.append(clock() - t0)
    base_t = statistics.median(runs["ReLU"][2])
    base_m = saved_activation_bytes(runs["ReLU"][0], x, amp)
    rows = []
    for label, (m, _, times) in runs.items():
        t = statistics.median(times)
        with single_pass("multi-pass" not in label), traced_as(label):
            mem = saved_activation_bytes(m, x, amp)
        add_row(
            rows,
            f"| {name} | {label} | {1e3 * t:.1f} | {args.batch / t:.1f} | {t / base_t:.2f} "
            f"| {mem / 2**20:.0f} | {mem / base_m:.2f} |",
        )
    return rows


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print a markdown table and return it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="shufflenetv2_x1_0,resnet50")
    eager = ",".join(v for v in VARIANTS if v not in COMPILE_ONLY)
    ap.add_argument("--variants", default=eager, help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=112)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (Inductor)")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="time steps by the wall clock, or by this process's CPU time (less sensitive to other jobs "
        "taking the cores of a shared machine; CPU only)",
    )
    add_run_args(ap)
    args = ap.parse_args(argv)
    apply_run_args(args)
    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu times CPU work only; use the wall clock with --device cuda")
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "ReLU" not in variants:
        ap.error(f"--variants must include 'ReLU' and only names from {list(VARIANTS)}; got {unknown}")
    if not args.compile and any(v in COMPILE_ONLY for v in variants):
        ap.error(
            f"--variants {[v for v in variants if v in COMPILE_ONLY]} compare compiled paths: add --compile"
        )
    lines = [
        f"# bench_train_step: {args.device}, amp={args.amp}, batch {args.batch}, {args.img} px, "
        f"{'channels_last' if args.channels_last else 'contiguous'}{', torch.compile' if args.compile else ''}, median of {args.steps} interleaved steps ({args.clock} clock), "
        f"{malloc_note()}",
        "",
        "| model | activation | step ms | img/s | time × ReLU | saved MiB | saved × ReLU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        lines += bench_model(name.strip(), variants, args)
    return finish_table(lines, args.out)


if __name__ == "__main__":
    run_script(main)
