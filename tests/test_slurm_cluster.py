"""train.py on a real one-node SLURM cluster (``scripts/local_slurm.sh``, started here as root where Slurm's
daemons are installed; skipped elsewhere; ``-m slow``; the script's own usage check runs in every suite): ``scancel`` stops the run for good, while
``scancel --signal=USR1`` and a preemption requeue it, each after a checkpoint, also for a two-rank DDP job."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, tiny_overrides

from acon.checkpoint import load_checkpoint

SCRIPT = str(ROOT / "scripts" / "local_slurm.sh")


def test_local_slurm_script_parses_and_explains_its_usage(tmp_path):
    """The cluster script runs in every suite (the cluster tests below only where Slurm is installed)."""
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    for args in ([], ["start"], ["restart", str(tmp_path)]):
        done = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr)
        assert done.stderr.startswith(("usage: ", "local_slurm: unknown command 'restart'")), done.stderr


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment that reaches a local cluster started for these tests (stopped after them)."""
    if not shutil.which("slurmctld") or not shutil.which("munged") or os.geteuid() != 0:
        pytest.skip("needs root and Slurm's daemons (apt install slurm-wlm munge)")
    state = tmp_path_factory.mktemp("slurm")
    ports = {"LOCAL_SLURM_PORTS": f"{free_port()} {free_port()}"}  # one cluster per test process (xdist)
    started = subprocess.run(
        ["bash", SCRIPT, "start", str(state)], capture_output=True, text=True, env={**os.environ, **ports}
    )
    assert started.returncode == 0, started.stdout + started.stderr
    yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "PYTHONUNBUFFERED": "1"}
    subprocess.run(["bash", SCRIPT, "stop", str(state)], capture_output=True)


def _sbatch(
    slurm: dict, tiny_imagenet: Path, out: Path, *options: str, launch: str = "exec"
) -> tuple[str, Path]:
    """Submit a long train.py run (``launch``: ``exec`` in the batch script, or ``srun`` for one DDP rank per
    task); (job id, its run dir)."""
    args = tiny_overrides(tiny_imagenet, out) + ["recipe.epochs=500", "trainer.ckpt_every_steps=1000"]
    command = f"cd {ROOT} && {launch} python train.py " + " ".join(args)
    log = out / "slurm-%j.out"
    done = subprocess.run(
        ["sbatch", "--parsable", "--exclusive", "-o", str(log), *options, "--wrap", command],
        env=slurm, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = done.stdout.strip().split(";")[0]
    return job, out


def _job(slurm: dict, job: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm, capture_output=True, text=True)
    return dict(word.partition("=")[::2] for word in shown.stdout.split())


def _wait(what: str, predicate, timeout: float = 150.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)


def _training(out: Path) -> bool:
    return any(m.read_text().count("\n") >= 1 for m in out.rglob("metrics.jsonl"))


def _ended(slurm: dict, job: str) -> dict[str, str]:
    """The job's fields once its first run has ended (requeued: PENDING, or finished)."""
    _wait(f"job {job} to end", lambda: _job(slurm, job).get("JobState") not in ("RUNNING", "COMPLETING"))
    return _job(slurm, job)


def _stopped_run(out: Path, job: str) -> str:
    """The job's output; its run saved a last.pt that loads, mid-run."""
    (last,) = out.rglob("last.pt")
    assert 0 < load_checkpoint(last)["progress"]["step"]
    return (out / f"slurm-{job}.out").read_text()


@pytest.mark.slow
def test_scancel_stops_the_run_without_a_requeue(slurm, tiny_imagenet, tmp_path):
    """Before: `scontrol requeue` requeued the cancelled job, which came back two minutes later."""
    job, out = _sbatch(slurm, tiny_imagenet, tmp_path)
    _wait("training", lambda: _training(out))
    subprocess.run(["scancel", job], env=slurm, check=True)
    fields = _ended(slurm, job)
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", fields
    log = _stopped_run(out, job)
    assert f"(SLURM job {job} was cancelled, so it is not requeued; rerun the same command to resume)" in log


@pytest.mark.slow
def test_a_usr1_signal_requeues_the_job(slurm, tiny_imagenet, tmp_path):
    """What `#SBATCH --signal=USR1@120` sends before the time limit; `--full` reaches a batch step."""
    job, out = _sbatch(slurm, tiny_imagenet, tmp_path)
    _wait("training", lambda: _training(out))
    subprocess.run(["scancel", "--full", "--signal=USR1", job], env=slurm, check=True)
    fields = _ended(slurm, job)
    subprocess.run(["scancel", job], env=slurm)  # the requeued job waits two minutes to start: not needed
    assert fields["JobState"] == "PENDING" and fields["Restarts"] == "1", fields
    assert f"exiting with status 75 (requeued SLURM job {job})" in _stopped_run(out, job)


@pytest.mark.slow
def test_a_preempted_job_is_requeued(slurm, tiny_imagenet, tmp_path):
    """A job in `low` that a `high` job preempts (PreemptMode=CANCEL, GraceTime 10 s) gets SIGTERM, saves and
    is requeued: a preemption is not a cancel."""
    job, out = _sbatch(slurm, tiny_imagenet, tmp_path, "-p", "low")
    _wait("training", lambda: _training(out))
    cpus = str(os.cpu_count())
    subprocess.run(
        ["sbatch", "-p", "high", "-c", cpus, "-o", "/dev/null", "--wrap", "true"], env=slurm, check=True
    )
    fields = _ended(slurm, job)
    subprocess.run(["scancel", job], env=slurm)
    assert fields["JobState"] == "PENDING" and fields["Restarts"] == "1", fields
    assert f"exiting with status 75 (requeued SLURM job {job})" in _stopped_run(out, job)


@pytest.mark.slow
def test_a_two_rank_job_is_requeued_under_kill_on_bad_exit(slurm, tiny_imagenet, tmp_path):
    """Two srun tasks, one DDP rank each (gloo), on a cluster with KillOnBadExit=1, where the first task to
    exit non-zero gets the others killed: rank 0 still saves and requeues before any rank exits 75."""
    job, out = _sbatch(slurm, tiny_imagenet, tmp_path, "-n", "2", launch="srun")
    _wait("training", lambda: _training(out))
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)  # srun's tasks get it
    fields = _ended(slurm, job)
    subprocess.run(["scancel", job], env=slurm)
    assert fields["JobState"] == "PENDING" and fields["Restarts"] == "1", fields
    log = _stopped_run(out, job)
    assert f"exiting with status 75 (requeued SLURM job {job})" in log
    assert "tasks 0-1: Exited with exit code 75" in log
