"""Distributed plumbing: SLURM environment adoption and CPU/gloo SyncBatchNorm."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from acon import distributed
from acon.syncbn import GlooSyncBatchNorm, convert_sync_batchnorm


def test_slurm_tasks_become_torch_env(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    monkeypatch.setattr(os, "environ", env)  # the code under test writes os.environ: keep it contained
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    assert distributed.world_size_from_env() == 16
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == ("5", "1", "node001")


def test_torchrun_env_wins_over_slurm(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("SLURM_PROCID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.world_size_from_env() == 2 and os.environ["RANK"] == "0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _syncbn_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 1
    w = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(3).double()
    ref.weight.data.uniform_(0.5, 2)
    ref.bias.data.uniform_(-1, 1)
    sync = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)).double(), torch.device("cpu"))
    sync[0].load_state_dict(ref.state_dict())
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * w).sum().backward()
    part = slice(2 * rank, 2 * rank + 2)
    xl = x[part].clone().requires_grad_()
    yl = sync(xl)
    (yl * w[part]).sum().backward()
    gw = sync[0].weight.grad.clone()
    dist.all_reduce(gw)
    errs = [
        (yl - y_ref[part]).abs().max().item(),
        (xl.grad - xr.grad[part]).abs().max().item(),
        (gw - ref.weight.grad).abs().max().item(),
        (sync[0].running_var - ref.running_var).abs().max().item(),
    ]
    queue.put((rank, isinstance(sync[0], GlooSyncBatchNorm), errs))
    dist.destroy_process_group()


def test_gloo_syncbn_equals_batchnorm_on_the_whole_batch():
    """2 ranks × 2 samples with GlooSyncBatchNorm give full-batch BatchNorm's outputs and gradients."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_syncbn_worker, args=(2, _free_port(), queue), nprocs=2)
    for _ in range(2):
        rank, converted, errs = queue.get()
        assert converted
        assert max(errs) < 1e-12, (rank, errs)
