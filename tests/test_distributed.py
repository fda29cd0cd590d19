"""Distributed plumbing: SLURM environment adoption, CPU/gloo SyncBatchNorm, BN statistics under DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, compose, free_port, run_cli, tiny_overrides

from acon import distributed
from acon.checkpoint import load_checkpoint
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


@pytest.mark.parametrize(
    "nodelist,host",
    [("node[01-04,07]", "node01"), ("gpu7,gpu9", "gpu7"), ("a-[3-5]-b,c", "a-3-b"), ("solo", "solo")],
)
def test_master_host_without_scontrol(monkeypatch, tmp_path, nodelist, host):
    """Containers often lack scontrol (pyxis/enroot, Singularity): the node list is expanded here (before:
    FileNotFoundError; and a failing scontrol gave 127.0.0.1 on every node of a multi-node job)."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    assert distributed.master_host(nodelist) == host
    monkeypatch.setenv("SLURM_NNODES", "4")
    with pytest.raises(RuntimeError, match="names no host for MASTER_ADDR on a 4-node job"):
        distributed.master_host("")


def test_slurm_port_follows_the_job_id(monkeypatch):
    """Two jobs sharing a node get different ports (the SLURM launcher's own setup line, 20000 + id % 20000)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    monkeypatch.setattr(os, "environ", env)
    env.update(SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_JOB_ID="123457", MASTER_ADDR="node001")
    distributed.world_size_from_env()
    assert env["MASTER_PORT"] == "23457"


def test_torchrun_env_wins_over_slurm(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("SLURM_PROCID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.world_size_from_env() == 2 and os.environ["RANK"] == "0"


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
    mp.spawn(_syncbn_worker, args=(2, free_port(), queue), nprocs=2)
    for _ in range(2):
        rank, converted, errs = queue.get()
        assert converted
        assert max(errs) < 1e-12, (rank, errs)


def test_ddp_logged_validation_equals_eval_of_the_saved_checkpoints(tiny_imagenet, tmp_path):
    """2 gloo ranks without SyncBN: every rank takes rank 0's BatchNorm statistics (and its EMA's) before
    validating and saving, so metrics.jsonl holds the figures eval.py gives for last.pt and best.pt."""
    out, env = tmp_path / "runs", {"ACON_EVAL_DIR": str(tmp_path / "eval")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_cli(
        [*torchrun, "train.py", *tiny_overrides(tiny_imagenet, out), "model=shufflenetv2_x0_5_small"]
        + ["activation=relu", "recipe.epochs=2", "recipe.ema_decay=0.5", "trainer.threads=1", "run_name=ddp"]
    )
    run_dir = out / "ddp"
    logged = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    run_cli([sys.executable, "eval.py", f"checkpoint={run_dir}"], env=env)
    rows = {r["checkpoint"]: r for r in csv.DictReader(open(run_dir / "eval.csv"))}
    from acon.evaluation import evaluate_checkpoint

    for name in ("last.pt", "best.pt"):
        path = run_dir / name
        val = logged[load_checkpoint(path)["progress"]["step"]]
        row = rows[str(path)]
        assert float(row["top1_err"]) == val["val_top1_err"] and int(row["count"]) == val["val_count"] == 9
        assert float(row["loss"]) == pytest.approx(val["val_loss"], rel=1e-5), name
        cfg = compose([f"checkpoint={path}", "use_ema=true", "trainer.device=cpu"], config_name="eval")
        ema = evaluate_checkpoint(path, cfg, distributed.DistInfo())
        assert ema["top1_err"] == val["val_ema_top1_err"], name
        assert ema["loss"] == pytest.approx(val["val_ema_loss"], rel=1e-5), name


@pytest.mark.slow  # two launches of two ranks: 20-40 s
def test_two_torchrun_agents_train_as_one_node_of_two_ranks_does(tiny_imagenet, tmp_path):
    """``torchrun --nnodes=2`` (two agents on loopback, one rank each, c10d rendezvous), as on two machines
    sharing the run dir's file system: one run dir, each epoch logged once, and the weights bit for bit
    those of ``--standalone --nproc_per_node=2``."""
    args = [*tiny_overrides(tiny_imagenet, tmp_path), "model=shufflenetv2_x0_5_small", "activation=acon_c"]
    args += ["recipe.epochs=2", "trainer.threads=1"]
    module = [sys.executable, "-m", "torch.distributed.run"]
    run_cli([*module, "--standalone", "--nproc_per_node=2", "train.py", *args, "run_name=one_node"])
    agent = [*module, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", "--max-restarts=0"]
    agent += [f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=two_nodes", "train.py", *args]
    agents = [subprocess.Popen([*agent, "run_name=two_nodes"], cwd=ROOT, stderr=subprocess.PIPE, text=True)]
    agents.append(
        subprocess.Popen([*agent, "run_name=two_nodes"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    )
    errs = [a.communicate(timeout=300)[1] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], errs
    runs = sorted(p.parent.name for p in tmp_path.rglob("results.json"))
    assert runs == ["one_node", "two_nodes"]
    epochs = [
        json.loads(r)["epoch"] for r in (tmp_path / "two_nodes" / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2]
    one, two = (load_checkpoint(tmp_path / r / "last.pt")["model"] for r in runs)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
