"""DistributedDataParallel from the environment torchrun/SLURM set: one call, no launcher glue."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, local rank, world size and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


NO_CUDA = (
    "trainer.device=cuda (trainer=gpu, and every paper experiment=) but no CUDA device is available on this "
    "machine: run it on a GPU machine, or add trainer.device=cpu to try it on the CPU"
)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → this rank's GPU when CUDA exists, else CPU.

    This rank's GPU is ``cuda:LOCAL_RANK`` when the node's GPUs are all visible (torchrun), and
    ``cuda:0`` when only one is (SLURM binding one GPU per task through ``CUDA_VISIBLE_DEVICES``).
    """
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device={name!r} is not one of ('auto', 'cpu', 'cuda')")
    if name == "cuda" and not torch.cuda.is_available():
        from acon.errors import ConfigError

        raise ConfigError(NO_CUDA)
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this process sees {visible} GPUs "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process "
            f"per visible GPU, or bind one GPU per task"
        )
    return torch.device("cuda", local_rank)


def adopt_slurm_env() -> None:
    """Under SLURM tasks without torchrun (e.g. submitit), export RANK/WORLD_SIZE/LOCAL_RANK for env://."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", 1)) < 2:
        return
    os.environ.update(
        RANK=os.environ["SLURM_PROCID"],
        WORLD_SIZE=os.environ["SLURM_NTASKS"],
        LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
    )
    # the port as the SLURM launcher's setup exports it: two jobs on one node, two ports
    job = os.environ.get("SLURM_JOB_ID", "")
    os.environ.setdefault("MASTER_PORT", str(20000 + int(job) % 20000) if job.isdigit() else "29500")
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = master_host(os.environ.get("SLURM_JOB_NODELIST", ""))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, expanded in Python: ``node[01-04,07],gpu1`` -> ``node01``."""
    head, depth = "", 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head += ch
    while "[" in head:  # each bracket: its first number, zero padding kept
        pre, rest = head.split("[", 1)
        inside, post = rest.split("]", 1)
        head = pre + inside.split(",")[0].split("-")[0] + post
    return head


def master_host(nodelist: str) -> str:
    """Rank 0's host for env:// under plain SLURM tasks: the node list's first host (``scontrol show
    hostnames`` where it runs, else expanded here: containers often lack scontrol); ``127.0.0.1`` only
    for a job on one node. A multi-node list that cannot be read is an error, not a silent localhost."""
    import subprocess

    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        nodes = out.stdout.split() if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        nodes = []
    host = nodes[0] if nodes else first_host(nodelist)
    if host:
        return host
    if int(os.environ.get("SLURM_NNODES", "1")) > 1:
        raise RuntimeError(
            f"SLURM_JOB_NODELIST={nodelist!r} names no host for MASTER_ADDR on a "
            f"{os.environ['SLURM_NNODES']}-node job: export MASTER_ADDR (rank 0's host) before srun"
        )
    return "127.0.0.1"


def world_size_from_env() -> int:
    """The world size this process will join (torchrun or SLURM tasks)."""
    adopt_slurm_env()
    return int(os.environ.get("WORLD_SIZE", 1))


def _restart_store(rank: int, world: int, timeout: datetime.timedelta) -> dict:
    """After a torchrun elastic restart, a store namespace of its own for this attempt.

    The agent keeps serving the same store across restarts, so without a prefix the new workers read
    the dead attempt's gloo addresses and fail to connect.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    return {"store": dist.PrefixStore(f"acon/attempt_{attempt}", client), "rank": rank, "world_size": world}


def setup(device: str = "auto", timeout_s: float = 600) -> DistInfo:
    """Read RANK/LOCAL_RANK/WORLD_SIZE (torchrun, or SLURM tasks) and init NCCL on GPU or gloo on CPU."""
    world = world_size_from_env()
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, timeout=timeout, **_restart_store(rank, world, timeout))
    return DistInfo(rank, local, world, dev)


def teardown() -> None:
    """Destroy the process group if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of numbers across ranks (identity when not distributed)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj):
    """Every rank's ``obj`` as a list (a one-element list when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """A barrier when distributed."""
    if dist.is_initialized():
        dist.barrier()


def sync_bn_buffers(*modules: torch.nn.Module | None) -> None:
    """Give every rank rank 0's BatchNorm running statistics, in each of ``modules`` (model, EMA copy).

    Without SyncBN each rank's running mean/var follow its own batches, so validating on every rank
    averages W slightly different models while the checkpoint holds rank 0's. This runs timm's
    ``distribute_bn`` in *broadcast* mode (not the mean) before every validation and every save:

    - a resume already gives every rank the checkpoint's (rank 0's) statistics, so broadcasting keeps a
      preempted-and-resumed DDP run bit-identical to one that never stopped; a mean would add an
      extra, rounding-dependent average at each preemption point;
    - rank 0's statistics never depend on the other ranks, so the saved weights do not depend on how
      often the run validated or saved;
    - train-mode BatchNorm uses batch statistics, so the broadcast changes no gradient, only what the
      other ranks evaluate with: exactly the model that is saved.

    A no-op outside DDP; under SyncBN the ranks already agree and it changes nothing.
    """
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return
    from timm.utils import distribute_bn

    for module in modules:
        if module is not None:
            distribute_bn(module, dist.get_world_size(), reduce=False)
