"""The machine: versions, devices, the fused ACON-C path, DDP all-reduces, disk and the resume point."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from acon.doctor import Check, fail, ok, warn

GiB = 1 << 30
DISK_FAIL_GIB, DISK_WARN_GIB = 1, 20
BASE_OPEN_FILES = 128  # libraries, logs, TensorBoard, NCCL sockets: what a rank opens besides batches
# shared-memory tensors per collated batch: each holds a file descriptor in the trainer while it waits
# (torch's file_descriptor sharing): images (or encoded bytes + offsets), params, targets
TENSORS_PER_BATCH = {"reference": 2, "fast": 3, "shards": 3, "gpu": 4, "shards_gpu": 4}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def check_versions() -> Iterator[Check]:
    """Python and library versions; CUDA, cuDNN and NCCL as torch was built with them."""
    yield ok("python", f"{platform.python_version()} ({platform.platform()})")
    for module in ("torch", "torchvision", "timm", "hydra", "triton"):
        v = _version(module)
        if v:
            yield ok(module, v)
        elif module == "triton":
            yield warn(module, "not installed: CUDA runs the fused ACON-C torch formulas, not the kernels")
        else:
            yield fail(module, f"cannot import {module}; run python -m pip install -r requirements.txt")
    if torch.version.cuda is None:
        yield warn("CUDA", "torch is a CPU-only build: no GPU training on this machine")
        return
    yield ok("CUDA", f"torch built with CUDA {torch.version.cuda}")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    yield ok("cuDNN", str(cudnn)) if cudnn else warn("cuDNN", "not available")
    try:
        yield ok("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
    except Exception as e:
        yield warn("NCCL", f"version unknown ({type(e).__name__})")


def check_devices() -> Iterator[Check]:
    """CPU count and every visible GPU with its memory."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    yield ok("CPUs", f"{os.cpu_count()} ({usable} usable by this process)")
    yield check_cpu_load()
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not n:
        yield warn("GPUs", "none visible: training runs on the CPU (trainer.device=auto)")
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        yield ok(
            f"GPU {i}", f"{p.name}, {p.total_memory / GiB:.1f} GiB, compute capability {p.major}.{p.minor}"
        )


def check_cpu_load(load: tuple[float, float, float] | None = None, cores=None) -> Check:
    """The load average against the cores this process may use: warn when other work keeps at least half
    of them busy (every CPU run is slower; ``trainer.threads=auto`` keeps it from collapsing)."""
    from acon import cpu_budget

    cores = cores or cpu_budget.usable_cores()
    load1, load5, _ = load or os.getloadavg()
    plan = cpu_budget.resolve("auto", "auto", torch.cuda.is_available(), cores)
    detail = f"load average {load1:.1f} (1 min), {load5:.1f} (5 min) on {cores.text()}"
    if load1 < max(1.0, cores.usable / 2):
        return ok("CPU load", f"{detail}; auto: {plan.threads} thread(s) + {plan.workers} loader worker(s)")
    return warn(
        "CPU load",
        f"{detail}: the machine is busy, CPU runs will take longer than on an idle machine; keep "
        f"trainer.threads=auto ({plan.threads} thread(s) + {plan.workers} loader worker(s) here) or 1, not more",
    )


def fused_path(x: torch.Tensor) -> str:
    """The path ``impl="auto"`` takes for ``x``, in words."""
    import acon.fused
    from acon.fused import cpu, ops

    if not acon.fused.available(x, "auto"):
        return "reference form (unfused)"
    if x.is_cuda:
        return "Triton kernels" if ops.triton_importable() else "torch formulas (no Triton)"
    execution = cpu.execution(x)
    return {"native": "C++ kernels", "compiled": "Inductor-compiled formulas"}.get(
        execution, "eager formulas"
    )


def _fused_check(probe: torch.Tensor, name: str) -> Check:
    """Run the path impl=auto takes for ``probe``'s device, dtype and layout against the reference form,
    with per-channel β (ACON-C) and per-sample β (Meta-ACON)."""
    import acon.fused
    from acon import fallbacks
    from acon.fused import selfcheck

    path = fused_path(probe)
    if path.startswith("reference"):
        return ok(name, "impl=auto uses the reference form here")
    before, problems = set(fallbacks.recorded()), []
    for per_sample, kind in ((False, "ACON-C"), (True, "Meta-ACON")):
        x, p1, p2, beta, dy = selfcheck.sample_inputs(probe, per_sample)
        leaves = [t.detach().clone().requires_grad_() for t in (x, p1, p2, beta)]
        y = acon.fused.acon_c(*leaves)
        got = [y.detach(), *torch.autograd.grad(y, leaves, dy)]
        problem = selfcheck.mismatch(got, selfcheck.reference_grads(x, p1, p2, beta, dy), probe.dtype)
        if problem:
            problems.append(f"{kind} {problem}")
    new = sorted(set(fallbacks.recorded()) - before)
    if problems:
        return fail(name, f"{path}: {'; '.join(problems)}")
    if new:
        reason = fallbacks.recorded()[new[0]]
        return warn(name, f"{path} failed their self-check ({reason}); runs use the eager formulas")
    return ok(name, f"{path}, forward and backward match the reference form")


def check_fused() -> Iterator[Check]:
    """The fused ACON-C path on every device, in fp32 and bf16, contiguous and channels-last."""
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in ["cpu"] + [f"cuda:{i}" for i in range(n_gpu)]:
        for dtype in (torch.float32, torch.bfloat16):
            for fmt, layout in (
                (torch.contiguous_format, "contiguous"),
                (torch.channels_last, "channels_last"),
            ):
                probe = torch.empty(2, 5, 3, 7, device=device, dtype=dtype).contiguous(memory_format=fmt)
                yield _fused_check(probe, f"fused ACON-C {device} {str(dtype)[6:]} {layout}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_worker(rank: int, world: int, backend: str, port: int) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        t = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(t)
        want = world * (world + 1) / 2
        if not torch.all(t == want):
            raise RuntimeError(f"rank {rank}: all-reduce gave {t.tolist()}, expected {want}")
    finally:
        dist.destroy_process_group()


def _all_reduce(backend: str, world: int) -> float:
    import torch.multiprocessing as mp

    t0 = time.perf_counter()
    mp.start_processes(
        _all_reduce_worker, args=(world, backend, _free_port()), nprocs=world, join=True, start_method="spawn"
    )
    return time.perf_counter() - t0


def check_gloo() -> Iterator[Check]:
    """A 2-process gloo all-reduce on the CPU (separate processes, TCP rendezvous on localhost)."""
    secs = _all_reduce("gloo", 2)
    yield ok("DDP gloo", f"2-process all-reduce correct ({secs:.1f} s including process start)")


def check_nccl() -> Iterator[Check]:
    """An NCCL all-reduce across every visible GPU (skipped with a warning without one)."""
    import torch.distributed as dist

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not n:
        yield warn("DDP NCCL", "skipped: no GPU visible")
    elif not dist.is_nccl_available():
        yield fail("DDP NCCL", f"{n} GPU(s) but this torch build has no NCCL")
    else:
        secs = _all_reduce("nccl", n)
        yield ok("DDP NCCL", f"all-reduce across {n} GPU(s) correct ({secs:.1f} s including process start)")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_and_resume(cfg) -> Iterator[Check]:
    """Free space where the run writes (against what it keeps), and its last.pt (the resume point)."""
    from acon.report import run_dir_of
    from acon.rundir import estimated_checkpoint_bytes, resume_path
    from acon.storage import kept_checkpoints, space_shortfall

    out = Path(str(cfg.out_dir)).expanduser()
    free = shutil.disk_usage(_existing(out.resolve())).free / GiB
    detail = f"{free:.1f} GiB free for out_dir={out}"
    if free < DISK_FAIL_GIB:
        yield fail("disk", f"{detail}: checkpoints will not fit")
    elif free < DISK_WARN_GIB:
        yield warn("disk", f"{detail} (a ResNet-152 run keeps about 1-2 GiB of checkpoints)")
    else:
        yield ok("disk", detail)
    run_dir = run_dir_of(cfg)
    yield _run_space(cfg, run_dir, estimated_checkpoint_bytes, kept_checkpoints, space_shortfall)
    if cfg.resume not in ("auto", "none", None) and not Path(str(cfg.resume)).is_file():
        yield fail("resume", f"resume={cfg.resume} does not exist")
        return
    path = resume_path(cfg, run_dir)
    if path is None:
        yield ok("resume", f"no checkpoint in {run_dir}: the run starts at step 0 (resume={cfg.resume})")
    else:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        yield ok(
            "resume", f"{path} ({path.stat().st_size / 2**20:.0f} MiB, {stamp}): the run continues from it"
        )


def open_files_needed(data_cfg, per_rank_batch: int) -> tuple[int, str]:
    """Open files one rank's training loader needs at most, and how that was counted, in words."""
    from acon.cpu_budget import resolve_workers

    workers, pipeline = resolve_workers(data_cfg), str(data_cfg.get("pipeline", "reference"))
    prefetch = int(data_cfg.get("prefetch_factor", 2)) if workers else 0
    in_flight = workers * prefetch + 2  # queued by the workers, plus the one in use and the one prepared
    per_batch = TENSORS_PER_BATCH.get(pipeline, 4)
    need = BASE_OPEN_FILES + in_flight * per_batch
    how = (
        f"data.pipeline={pipeline} with {workers} workers x prefetch {prefetch} (+2) batches of "
        f"{per_rank_batch} images in flight, {per_batch} shared tensors each, + {BASE_OPEN_FILES} base"
    )
    return need, how


def check_open_files(cfg) -> Iterator[Check]:
    """``ulimit -n`` (this process's soft limit on open files) against what the configured loader needs."""
    world = max(int(os.environ.get("WORLD_SIZE", 1)), 1)
    per_rank = max(int(cfg.recipe.batch_size) // world, 1)
    need, how = open_files_needed(cfg.data, per_rank)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    strategy = torch.multiprocessing.get_sharing_strategy()
    limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    detail = f"ulimit -n is {limit}; about {need} needed per rank ({how}; sharing strategy {strategy})"
    if soft != resource.RLIM_INFINITY and soft < need:
        fix = f"raise it with `ulimit -n {max(need * 2, 4096)}` before training" + (
            f" (the hard limit is {hard}: ask the cluster admins)"
            if hard != resource.RLIM_INFINITY and hard < need
            else ""
        )
        yield fail("open files", f"{detail}: loader workers would die of 'Too many open files'; {fix}")
    elif soft != resource.RLIM_INFINITY and soft < 2 * need:
        yield warn("open files", f"{detail}: little margin; `ulimit -n {max(need * 2, 4096)}` is safer")
    else:
        yield ok("open files", detail)


def _run_space(cfg, run_dir: Path, estimate, kept_checkpoints, space_shortfall) -> Check:
    """This run's checkpoints (size × how many it keeps, plus a margin) against the free space."""
    try:
        size = estimate(cfg)
    except Exception as e:  # the model check reports a model that cannot be built
        return warn("disk for this run", f"checkpoint size unknown ({type(e).__name__}: {e})")
    kept = kept_checkpoints(int(cfg.trainer.keep_step_checkpoints))
    shortfall = space_shortfall(run_dir, size, kept)
    if shortfall:
        return warn("disk for this run", shortfall)
    return ok(
        "disk for this run", f"room for {kept} checkpoints of about {size / 2**20:.1f} MiB in {run_dir}"
    )
