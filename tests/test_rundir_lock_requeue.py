"""A requeued SLURM job waits for the run dir lock its own previous run still holds (a lost node's NFS lease
lasts until it expires); any other holder is refused at once, as before."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import ROOT

from acon import runlock
from acon.runlock import RunDirBusy, RunLock, refuse_if_busy

# a process holding a run dir's lock through acon.runlock for argv[2] seconds, as a run of the SLURM job
# in its environment does
HOLD = (
    "import sys, time\n"
    "from acon.runlock import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


@pytest.fixture
def hold(tmp_path):
    """hold(job, restart, seconds): the run dir tmp_path/r locked by that run of SLURM job ``job``."""
    procs = []

    def start(job: str, restart: int, seconds: float):
        env = {"SLURM_JOB_ID": job, "SLURM_RESTART_COUNT": str(restart), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-c", HOLD, str(tmp_path / "r"), str(seconds)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return tmp_path / "r"

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture
def requeued_run(monkeypatch):
    """This process is run 1 of SLURM job 77 (requeued once)."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")


@pytest.mark.parametrize("check", ["lock", "preflight"])
def test_requeued_job_waits_for_its_previous_runs_lock(hold, requeued_run, capsys, check):
    """Before: exit 2 ("run dir ... is in use by another run"), and the requeued job ended for good."""
    run_dir = hold("77", 0, 2.0)
    t0 = time.monotonic()
    if check == "lock":
        lock = RunLock(run_dir).acquire()
        assert lock.holder["slurm_job"] == "77" and lock.holder["slurm_restart"] == 1
        lock.release()
    else:
        refuse_if_busy(run_dir)  # train.py's check before Hydra waits the same way
    assert time.monotonic() - t0 >= 1.0  # it waited for the holder to end
    err = capsys.readouterr().err
    assert "is still locked by this job's previous run" in err and "SLURM job 77 before its requeue" in err
    assert "the previous run's lock ended after" in err


@pytest.mark.parametrize("job, restart", [("78", 0), ("77", 1)])  # another job; this job's own run again
def test_other_holders_are_refused_at_once(hold, requeued_run, capsys, job, restart):
    run_dir = hold(job, restart, 60.0)
    with pytest.raises(RunDirBusy, match="is in use by another run"):
        RunLock(run_dir).acquire()
    assert "waiting" not in capsys.readouterr().err


def test_the_wait_is_bounded(hold, requeued_run, monkeypatch):
    monkeypatch.setattr(runlock, "EARLIER_RUN_WAIT_S", 1.5)
    run_dir = hold("77", 0, 60.0)
    t0 = time.monotonic()
    with pytest.raises(RunDirBusy, match="is in use by another run"):
        RunLock(run_dir).acquire()
    assert 1.5 <= time.monotonic() - t0 < 30
