"""How many CPU threads and loader workers a process uses: ``trainer.threads`` and ``data.num_workers``.

``auto`` (the default of both) keeps every process inside the cores it may use: intra-op threads plus
loader workers, times the training processes on the node, never exceed the usable cores (the CPU
affinity of this process, and the cgroup CPU quota when there is one). On a busy or small machine more
threads than cores do not just share the cores: OpenMP's fork-join regions wait for their slowest
thread, and the default run took 6x longer with 2 threads against two busy processes on 2 cores.
``train.py`` and ``eval.py`` also ask OpenMP to wait passively (``OMP_WAIT_POLICY=PASSIVE``,
``KMP_BLOCKTIME=0``, set before torch loads; a value already in the environment wins), so a waiting
thread sleeps instead of spinning against other work.

The choice depends only on the machine and the launch, never on its load at start, so a resumed run on
the same machine uses the same threads (``deterministic=true`` resumes bit-exactly).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
MAX_GPU_WORKERS = 8  # loader workers per GPU process under auto (the ImageNet recipes' former fixed value)
MAX_GPU_THREADS = 4  # intra-op threads of a GPU process under auto: its CPU ops are small


@dataclass(frozen=True)
class Cores:
    """The cores this process may use, and what limited them."""

    usable: int
    affinity: int
    quota: float | None  # CPUs of the cgroup quota; None when there is none

    def text(self) -> str:
        """``2 usable cores (affinity 2, no cgroup quota)``."""
        quota = "no cgroup CPU quota" if self.quota is None else f"cgroup CPU quota {self.quota:g}"
        return f"{self.usable} usable core{'s' * (self.usable != 1)} (affinity {self.affinity}, {quota})"


@dataclass(frozen=True)
class CpuPlan:
    """The intra-op threads and loader workers of one process, and why."""

    threads: int
    workers: int
    cores: Cores
    processes: int
    threads_from: str  # "auto", "trainer.threads=N", "torch's default" ...
    workers_from: str

    @property
    def total(self) -> int:
        """CPU-hungry threads on the node: processes x (intra-op threads + loader workers)."""
        return self.processes * (self.threads + self.workers)

    def line(self) -> str:
        """One line for the banner and eval.py: what was chosen and why."""
        t, w, p = self.threads, self.workers, self.processes
        verdict = (
            ""
            if self.total <= self.cores.usable
            else f": {self.total} > {self.cores.usable}, oversubscribed (slow when other work shares the cores)"
        )
        wait = os.environ.get("OMP_WAIT_POLICY", "unset")
        return (
            f"cpu: {t} thread{'s' * (t != 1)} [{self.threads_from}] + {w} loader worker{'s' * (w != 1)} "
            f"[{self.workers_from}] per process, {p} process{'es' * (p != 1)} on {self.cores.text()}"
            f"{verdict}; OMP_WAIT_POLICY={wait}"
        )


def cgroup_quota(root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its parents, None when unlimited.

    Reads cgroup v2 ``cpu.max`` (``max 100000`` or ``150000 100000``) and cgroup v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, from the process's own cgroup (``/proc/self/cgroup``)
    up to the hierarchy's root under ``root``.
    """
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_SELF_CGROUP
    try:
        own = [ln.split(":", 2) for ln in proc_cgroup.read_text().splitlines() if ln.count(":") >= 2]
    except OSError:
        own = []
    v2 = next((path for _, ctrl, path in own if ctrl == ""), "/")
    v1 = next((path for _, ctrl, path in own if "cpu" in ctrl.split(",")), "/")
    v1_mount = next((root / d for d in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / d).is_dir()), None)
    quotas = [_v2_quota(d) for base in (root, root / "unified") for d in _up_from(base, v2)]
    if v1_mount is not None:
        quotas += [_v1_quota(d) for d in _up_from(v1_mount, v1)]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _up_from(base: Path, path: str) -> list[Path]:
    """``base/path`` and each of its parents up to ``base``."""
    here, dirs = base / path.strip().strip("/"), []
    while base == here or base in here.parents:
        dirs.append(here)
        here = here.parent
    return dirs


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = folder.joinpath("cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int(folder.joinpath("cpu.cfs_quota_us").read_text())
        period = int(folder.joinpath("cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cores(root: Path | None = None, proc_cgroup: Path | None = None) -> Cores:
    """The cores this process may use: its CPU affinity, cut to the cgroup quota (rounded down, >= 1)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_quota(root, proc_cgroup)
    usable = affinity if quota is None else max(1, min(affinity, math.floor(quota)))
    return Cores(usable, affinity, quota)


def processes_on_node(env: dict | None = None, affinity: int | None = None) -> int:
    """Training processes sharing this node's cores: torchrun's LOCAL_WORLD_SIZE; SLURM tasks on the node
    when their CPUs are not bound per task (a bound task's affinity is already its own share)."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" in env:
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    tasks = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
    if tasks and int(env.get("SLURM_NTASKS", 1)) > 1 and (affinity or 0) >= (os.cpu_count() or 1):
        return max(1, int(tasks.group()))
    return 1


def auto_workers(share: int, on_gpu: bool) -> int:
    """Loader workers of one process under ``data.num_workers=auto``, given its share of the cores.

    On a GPU the CPU only feeds it: all but one core of the share decode (at most 8). On the CPU the model
    is the work: a quarter of the share decodes ahead (one worker from 2 cores on), the rest computes.
    """
    if on_gpu:
        return max(0, min(MAX_GPU_WORKERS, share - 1))
    return 0 if share < 2 else max(1, share // 4)


def resolve(
    threads, workers, on_gpu: bool = False, cores: Cores | None = None, processes: int | None = None
) -> CpuPlan:
    """The plan for settings ``threads`` (``auto``, an int, or None: torch's default) and ``workers``
    (``auto`` or an int)."""
    cores = cores or usable_cores()
    procs = processes or processes_on_node(affinity=cores.affinity)
    share = max(1, cores.usable // procs)
    if workers == AUTO:
        n_workers, workers_from = auto_workers(share, on_gpu), "auto"
    else:
        n_workers, workers_from = int(workers), f"data.num_workers={int(workers)}"
    if threads == AUTO:
        n_threads, threads_from = max(1, share - n_workers), "auto"
        if on_gpu:
            n_threads = min(n_threads, MAX_GPU_THREADS)
        omp = os.environ.get("OMP_NUM_THREADS", "")
        if omp.isdigit() and 0 < int(omp) < n_threads:
            n_threads, threads_from = int(omp), f"auto, capped by OMP_NUM_THREADS={omp}"
    elif threads is None:
        import torch

        n_threads, threads_from = torch.get_num_threads(), "torch's default"
    else:
        n_threads, threads_from = int(threads), f"trainer.threads={int(threads)}"
    return CpuPlan(n_threads, n_workers, cores, procs, threads_from, workers_from)


def resolve_workers(data_cfg) -> int:
    """``data.num_workers`` as a number (``auto`` resolved for this process)."""
    setting = data_cfg.get("num_workers", 0)
    return resolve(AUTO, setting, _on_gpu()).workers if setting == AUTO else int(setting)


def _on_gpu(device: str = "auto") -> bool:
    import torch

    return device != "cpu" and torch.cuda.is_available()


_applied: CpuPlan | None = None


def configure(cfg) -> CpuPlan:
    """Resolve ``trainer.threads`` and ``data.num_workers`` of ``cfg``, write the numbers back into it,
    and set torch's intra-op threads; :func:`applied` returns the plan afterwards."""
    import torch

    global _applied
    plan = resolve(cfg.trainer.threads, cfg.data.get("num_workers", 0), _on_gpu(str(cfg.trainer.device)))
    if cfg.trainer.threads is not None:
        torch.set_num_threads(plan.threads)
        cfg.trainer.threads = plan.threads
    if "num_workers" in cfg.data:
        cfg.data.num_workers = plan.workers
    _applied = plan
    return plan


def applied() -> CpuPlan | None:
    """The plan :func:`configure` last applied in this process, if any."""
    return _applied
