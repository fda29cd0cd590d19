"""Preemption signals and dead ranks on real processes: save at a step boundary, exit 75, resume."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides
from test_fault_checkpoints import descendants, reap, start, wait_for

from acon.checkpoint import load_checkpoint
from acon.preempt import REQUEUE_EXIT_CODE

RUN = "r"


def cmd(root: Path, out: Path, iterations: int, *launcher: str) -> list[str]:
    """A tiny run of ``iterations`` steps that saves after every step (so progress is visible)."""
    return [
        sys.executable,
        *(launcher or ("train.py",)),
        *tiny_overrides(root, out),
        "model=shufflenetv2_x0_5_small",
        "activation=relu",
        f"recipe.iterations={iterations}",
        "trainer.ckpt_every_steps=1",
        "trainer.threads=1",
        f"run_name={RUN}",
    ]


def started(run_dir: Path):
    return lambda: (run_dir / "last.pt").exists()


def finish(args: list[str], timeout: float = 300) -> tuple[int, str]:
    proc = start(args)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        reap(proc)
    return proc.returncode, err


@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_signal_saves_at_step_boundary_exits_75_and_rerun_resumes(tiny_imagenet, tmp_path, sig):
    args, run_dir = cmd(tiny_imagenet, tmp_path, 40), tmp_path / RUN
    proc = start(args, env={"SLURM_JOB_ID": ""})
    try:
        assert wait_for(started(run_dir), proc), proc.communicate()[1][-3000:]
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        reap(proc)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert f"received {sig}: checkpoint saved, exiting with status 75" in err
    state = load_checkpoint(run_dir / "last.pt")
    p = state["progress"]
    assert 0 < p["step"] < 40 and p["batch_in_epoch"] == p["step"] - 6 * p["epoch"], p
    assert not (run_dir / "results.json").exists()
    rc, err = finish(args)  # the same command again
    assert rc == 0, err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == 40


def worker_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the train.py workers under a torchrun agent."""
    ranks = {}
    for pid in descendants(agent_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"train.py" in cmdline:
            for kv in env:
                if kv.startswith(b"RANK="):
                    ranks[int(kv[5:])] = pid
    return ranks


def torchrun(root: Path, out: Path, iterations: int, restarts: int) -> list[str]:
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    return cmd(root, out, iterations, *launcher, f"--max-restarts={restarts}", "train.py")


def kill_rank_when_running(proc, run_dir: Path, rank: int = 1) -> float:
    """SIGKILL one rank once training is under way; returns the time of the kill."""
    assert wait_for(started(run_dir), proc, poll=0.01), proc.communicate()[1][-3000:]
    ranks = worker_pids(proc.pid)
    assert set(ranks) == {0, 1}, ranks
    import os

    os.kill(ranks[rank], signal.SIGKILL)
    return time.monotonic()


def test_dead_rank_ends_whole_job_quickly(tiny_imagenet, tmp_path):
    proc = start(torchrun(tiny_imagenet, tmp_path, 10_000, restarts=0))
    try:
        t_kill = kill_rank_when_running(proc, tmp_path / RUN)
        survivors = worker_pids(proc.pid)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t_kill
    finally:
        reap(proc)
    assert proc.returncode != 0 and took < 60, (proc.returncode, took, err[-3000:])
    assert survivors.get(0) is None or not Path(f"/proc/{survivors[0]}").exists()
    assert load_checkpoint(tmp_path / RUN / "last.pt")["world_size"] == 2


def test_torchrun_restart_resumes_from_last_checkpoint(tiny_imagenet, tmp_path):
    run_dir = tmp_path / RUN
    proc = start(torchrun(tiny_imagenet, tmp_path, 30, restarts=1))
    try:
        kill_rank_when_running(proc, run_dir)
        _, err = proc.communicate(timeout=400)
    finally:
        reap(proc)
    assert proc.returncode == 0, err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == 30 and results["world_size"] == 2
    resumed = [line for line in err.splitlines() if "acon: resuming from" in line]
    assert resumed and "at step 0 " not in resumed[0], err[-3000:]  # restarted from a saved step
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, len(log) + 1))  # no epoch lost or repeated
