"""The steps of ``scripts/gpu_check.sh`` that run in Python, one step per process, at GPU or CPU scale.

Each step prints markdown lines (what ``gpu_check.sh`` writes to the step's file) and exits 0 when its
check passed, 1 when it failed::

    python scripts/gpu_check_steps.py resume --device cuda        # train 3 steps, resume on the GPU to 5
    python scripts/gpu_check_steps.py triton --device cuda        # the kernels serve, no fallback, on every GPU
    python scripts/gpu_check_steps.py pipeline --device cuda --open-files 1024
    python scripts/gpu_check_steps.py deterministic --device cuda # every family's backward, deterministic mode

On a CPU (``--device cpu``) the same checks run small: ``triton`` then needs ``TRITON_INTERPRET=1
ACON_FUSED_CPU_BACKEND=triton`` (the interpreter), ``pipeline`` a lower ``--open-files``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def _compose(overrides: list[str]):
    from acon.doctor import compose

    return compose(overrides)


def step_resume(args: argparse.Namespace) -> bool:
    """Train a few steps, then resume from last.pt on the same device (the SLURM requeue path)."""
    from acon.trainer import train

    out = Path(args.out or tempfile.mkdtemp(prefix="acon-gpu-check-resume-"))
    device = ["trainer=gpu"] if args.device == "cuda" else ["trainer.device=cpu"]
    base = [*device, "trainer.progress=false", f"out_dir={out}", "run_name=resume", "recipe.batch_size=32"]
    import json

    from acon.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    train(_compose([*base, "trainer.max_steps=3"]))  # a max_steps stop returns None; results.json has it
    first = json.loads((out / "resume" / "results.json").read_text())
    t1 = time.perf_counter()
    train(_compose([*base, "trainer.max_steps=5", "resume=auto"]))
    second = json.loads((out / "resume" / "results.json").read_text())
    t2 = time.perf_counter()
    ok = first.get("steps") == 3 and second.get("steps") == 5
    progress = load_checkpoint(out / "resume" / "last.pt", mmap=True)["progress"]
    resumed = len(progress.get("wall_segments_s", [])) == 2  # two segments: the run went on from step 3
    print(f"| resume on {args.device} | first run to step 3: {t1 - t0:.1f} s | resumed at step 3 to 5: "
          f"{t2 - t1:.1f} s | {'ok' if ok and resumed else 'FAILED'} |")  # fmt: skip
    return ok and resumed


def _triton_probe(device: str) -> list[str]:
    """Problems of the fused ACON-C path on ``device``: not Triton, a mismatch, or a recorded fallback."""
    import torch

    import acon.fused
    from acon import fallbacks
    from acon.fused import ops, selfcheck

    problems = []
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            probe = torch.empty(4, 24, 9, 7, device=device, dtype=dtype).contiguous(memory_format=fmt)
            if not ops._use_triton(probe):
                return [f"{device}: the Triton kernels do not serve {dtype} here"]
            for per_sample in (False, True):
                x, p1, p2, beta, dy = selfcheck.sample_inputs(probe, per_sample)
                leaves = [t.detach().clone().requires_grad_() for t in (x, p1, p2, beta)]
                y = acon.fused.acon_c(*leaves)
                got = [y.detach(), *torch.autograd.grad(y, leaves, dy)]
                bad = selfcheck.mismatch(got, selfcheck.reference_grads(x, p1, p2, beta, dy), dtype)
                if bad:
                    problems.append(f"{device} {dtype} {fmt}: {bad}")
    problems += [f"fallback {k}: {v}" for k, v in fallbacks.recorded().items()]
    return problems


def step_triton(args: argparse.Namespace) -> bool:
    """The Triton kernels serve ACON-C/Meta-ACON on every visible GPU (not only the current one)."""
    import torch

    if args.device == "cuda":
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        torch.cuda.set_device(0)  # cuda:1.. are then non-current devices: the launch must follow x
    else:
        devices = ["cpu"]
    ok = True
    for device in devices:
        t0 = time.perf_counter()
        problems = _triton_probe(device)
        ok &= not problems
        detail = "; ".join(problems) if problems else "forward and backward match, no fallback"
        print(f"| Triton kernels on {device} | {time.perf_counter() - t0:.1f} s incl. compile | {detail} |")
    return ok


def step_pipeline(args: argparse.Namespace) -> bool:
    """The gpu input pipeline under a limit on open files (``ulimit -n``): batches arrive, and how fast."""
    import torch
    from smoke_train import build_folder

    from acon.data.pipelines import DeviceLoader, build_loader, build_train_pipeline

    data = build_folder(Path(args.out or "/tmp/acon-smoke") / "data", args.batch * 4, 10, args.img)
    pipe = build_train_pipeline("gpu", data / "train", img_size=args.img, device=args.device)
    loader = build_loader(pipe, args.batch, num_workers=args.workers, seed=0, prefetch_factor=4)
    loader.timeout = 60  # a worker dead of EMFILE raises instead of hanging the step
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (args.open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    t0, n, peak = time.perf_counter(), 0, 0
    try:
        for _ in range(3):  # three passes over 4 batches: the workers' queues fill and drain
            for images, _, _ in DeviceLoader(loader, pipe.device_transform, args.device):
                n += images.shape[0]
                peak = max(peak, len(os.listdir("/proc/self/fd")))
        if args.device == "cuda":
            torch.cuda.synchronize()
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    secs = time.perf_counter() - t0
    print(f"| gpu pipeline, ulimit -n {args.open_files} | {args.workers} workers x prefetch 4, batch "
          f"{args.batch}, {args.img} px | {n} images in {secs:.1f} s ({n / max(secs, 1e-9):.0f}/s), "
          f"peak {peak} open files | {error or 'ok'} |")  # fmt: skip
    return error is None and n > 0


def _family_backward(name: str, device: str, batch: int, img: int) -> None:
    import torch
    import torch.nn.functional as F

    from models import create_model

    model = create_model(name, activation="meta_acon", num_classes=10).to(device)
    fmt = torch.channels_last if device == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=fmt)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = F.cross_entropy(model(x).float(), torch.arange(batch, device=device) % 10)
    loss.backward()


def step_deterministic(args: argparse.Namespace) -> bool:
    """One model per family trains a step under torch.use_deterministic_algorithms(True) (as deterministic=true)."""
    import torch

    from models.registry import get_entry, list_models

    names = {}
    for name in list_models():
        names.setdefault(get_entry(name).family, name)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as a deterministic=true run sets it
    torch.use_deterministic_algorithms(True)
    ok = True
    for family, name in sorted(names.items()):
        try:
            _family_backward(name, args.device, min(args.batch, 8), args.img)
            result = "ok"
        except RuntimeError as e:
            result, ok = f"FAILED: {str(e).strip().splitlines()[0][:300]}", False
        print(f"| deterministic backward on {args.device} | {family} ({name}, Meta-ACON) | {result} |")
    if not ok and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        print("| note | CUBLAS_WORKSPACE_CONFIG is unset: cuBLAS needs :4096:8 under deterministic mode | |")
    return ok


STEPS = {
    "resume": step_resume,
    "triton": step_triton,
    "pipeline": step_pipeline,
    "deterministic": step_deterministic,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=tuple(STEPS))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", help="folder for the step's data and runs (default: a temporary folder)")
    ap.add_argument("--open-files", type=int, default=1024, help="pipeline: the ulimit -n to run under")
    ap.add_argument("--workers", type=int, default=8, help="pipeline: loader workers")
    ap.add_argument("--batch", type=int, default=256, help="pipeline: batch size (deterministic: up to 8)")
    ap.add_argument("--img", type=int, default=224, help="pipeline and deterministic: image size")
    args = ap.parse_args(argv)
    return 0 if STEPS[args.step](args) else 1


if __name__ == "__main__":
    sys.exit(main())
