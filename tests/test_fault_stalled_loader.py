"""A stuck input pipeline on real processes: a DataLoader worker stopped with SIGSTOP (as a read from a hung
file system looks). Stop signals still end the run within seconds, and trainer.data_timeout_s ends it on
its own; both save last.pt first and exit 75, and the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from test_fault_checkpoints import descendants, reap, start, wait_for

from acon.checkpoint import load_checkpoint
from acon.preempt import REQUEUE_EXIT_CODE

RUN = "r"


def cmd(root: Path, out: Path, *extra: str, launcher: tuple[str, ...] = ("train.py",)) -> list[str]:
    """60 steps of a tiny run with 2 loader workers, saving after every step (progress is visible). Batch 1:
    24 steps an epoch, so the worker stopped after the first save is a training worker, far from the
    epoch's end (the validation loader has workers of its own, which the batch wait does not cover)."""
    return [
        sys.executable,
        *launcher,
        *tiny_overrides(root, out),
        "model=shufflenetv2_x0_5_small",
        "activation=relu",
        "data.num_workers=2",
        "recipe.batch_size=1",
        "recipe.base_batch_size=1",
        "recipe.iterations=60",
        "trainer.ckpt_every_steps=1",
        "trainer.threads=1",
        f"run_name={RUN}",
        *extra,
    ]


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def rank_of_pids(agent: int) -> dict[int, int]:
    """{pid: RANK} of every train.py process under a torchrun agent (ranks and their loader workers)."""
    out = {}
    for pid in descendants(agent):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[pid] = int(kv[5:])
    return out


def stop_one_worker(proc, run_dir: Path, workers_of=None) -> int:
    """Once training saved a step with both loader workers up, SIGSTOP one worker; returns its pid."""
    workers_of = workers_of or (lambda: descendants(proc.pid))
    assert wait_for(lambda: (run_dir / "last.pt").exists() and len(workers_of()) >= 2, proc), (
        proc.communicate()[1][-3000:]
    )
    pid = workers_of()[0]
    os.kill(pid, signal.SIGSTOP)
    return pid


def stuck(run_dir: Path, proc, quiet_s: float = 3.0, timeout: float = 60) -> bool:
    """True once last.pt has not changed for ``quiet_s`` (the loop waits for the stopped worker)."""
    end, last = time.monotonic() + timeout, None
    while time.monotonic() < end and proc.poll() is None:
        mtime = (run_dir / "last.pt").stat().st_mtime_ns
        if mtime != last:
            last, since = mtime, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return True
        time.sleep(0.1)
    return False


def test_group_sigterm_while_a_worker_is_stopped_saves_and_exits_75(tiny_imagenet, tmp_path):
    """Before: the loop waited for the stopped worker's batch forever, SIGTERM or not."""
    run_dir = tmp_path / RUN
    proc = start(cmd(tiny_imagenet, tmp_path), env={"SLURM_JOB_ID": ""})  # the default timeout: minutes
    try:
        stop_one_worker(proc, run_dir)
        assert stuck(run_dir, proc), "the run did not wait for the stopped worker"
        step = load_checkpoint(run_dir / "last.pt")["progress"]["step"]
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        reap(proc)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert took < 15, took
    assert "received SIGTERM: checkpoint saved, exiting with status 75 (rerun the same command" in err
    assert "Traceback" not in err, err[-3000:]
    state = load_checkpoint(run_dir / "last.pt")
    assert state["progress"]["step"] == step and 0 < step < 60  # nothing lost, nothing invented
    log = (run_dir / "train.log").read_text()
    assert "received SIGTERM: checkpoint saved, exiting with status 75" in log  # the stop reason is kept


def test_data_timeout_names_the_stuck_worker_exits_75_and_the_rerun_resumes(tiny_imagenet, tmp_path):
    run_dir = tmp_path / RUN
    args = cmd(tiny_imagenet, tmp_path, "trainer.data_timeout_s=2", "recipe.iterations=24")
    proc = start(args, env={"SLURM_JOB_ID": ""})
    try:
        pid = stop_one_worker(proc, run_dir)
        _, err = proc.communicate(timeout=60)  # before: waits forever
    finally:
        reap(proc)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    lines = [ln for ln in err.splitlines() if "data_timeout_s" in ln]
    assert len(lines) == 1, err[-3000:]
    assert f"pid {pid}, T (stopped)" in lines[0] and "exiting with status 75" in lines[0], lines
    assert "Traceback" not in err, err[-3000:]
    step = load_checkpoint(run_dir / "last.pt")["progress"]["step"]
    assert 0 < step < 24
    assert lines[0].split("acon: ", 1)[1] in (run_dir / "train.log").read_text()

    proc = start(args, env={"SLURM_JOB_ID": ""})  # the same command, the file system healthy again
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        reap(proc)
    assert proc.returncode == 0, err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == 24


@pytest.mark.slow
def test_one_stalled_rank_stops_every_rank_in_step(tiny_imagenet, tmp_path):
    """torchrun, 2 ranks: a worker of rank 1 stopped; both ranks save and exit together, no rank is left
    in a collective (before: rank 0 waited in the gradient all-reduce, rank 1 for its batch)."""
    run_dir = tmp_path / RUN
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py")
    proc = start(
        cmd(
            tiny_imagenet,
            tmp_path,
            "trainer.data_timeout_s=3",
            "recipe.iterations=200",
            "recipe.batch_size=2",
            "recipe.base_batch_size=2",
            launcher=launcher,
        ),
        env={"SLURM_JOB_ID": ""},
    )

    def rank1_workers() -> list[int]:
        """The loader workers of rank 1: the children of the rank-1 process (they carry RANK=1 too)."""
        ranked = [pid for pid, rank in rank_of_pids(proc.pid).items() if rank == 1]
        main = [pid for pid in ranked if parent(pid) not in ranked]
        return [pid for pid in ranked if main and parent(pid) == main[0]]

    try:
        pid = stop_one_worker(proc, run_dir, rank1_workers)
        _, err = proc.communicate(timeout=120)
    finally:
        reap(proc)
    assert proc.returncode != 0, err[-3000:]
    assert err.count("exiting with status 75") == 1, err[-3000:]
    line = next(ln for ln in err.splitlines() if "data_timeout_s" in ln)
    assert "rank 1: DataLoader worker" in line and f"pid {pid}, T (stopped)" in line, line
    state = load_checkpoint(run_dir / "last.pt")
    assert state["world_size"] == 2 and 0 < state["progress"]["step"] < 200


class _HangsOnARead(torch.utils.data.Dataset):
    """Item 1 blocks in a read of a named pipe no one writes to (a read from a hung mount looks alike)."""

    def __init__(self, fifo: str) -> None:
        self.fifo = fifo

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        if i == 1:
            fd = os.open(self.fifo, os.O_RDWR)  # opens at once; the read below never returns
            os.read(fd, 1)
        return torch.tensor(float(i))


def test_the_timeout_names_the_worker_and_the_file_it_is_stuck_reading(tmp_path):
    """In-process, a real loader with 2 workers: the wait ends after the timeout, naming the worker that
    owes the batch, its state and the file it is reading; the other worker is not blamed."""
    from acon.data.watchdog import BatchWait, stall_report
    from acon.preempt import PreemptionFlag, worker_ignores_stop_signals

    fifo = tmp_path / "hung.JPEG"
    os.mkfifo(fifo)
    loader = torch.utils.data.DataLoader(
        _HangsOnARead(str(fifo)), batch_size=1, num_workers=2, worker_init_fn=worker_ignores_stop_signals
    )
    batches = iter(loader)
    pids = [w.pid for w in batches._workers]
    waiter = BatchWait(PreemptionFlag(), timeout_s=1.0).install()
    try:
        assert waiter.next(batches) is not None  # item 0, from worker 0
        t0 = time.monotonic()
        assert waiter.next(batches) is None and waiter.ended == "timeout"  # item 1: worker 1 hangs
        assert time.monotonic() - t0 < 10
        report = stall_report(loader, batches)
    finally:
        waiter.restore()
        with open(fifo, "wb") as unblock:  # let the worker finish, so the loader shuts down cleanly
            unblock.write(b"x")
        del batches
    assert report.startswith(f"DataLoader worker 1 (pid {pids[1]}, S (sleeping)"), report
    assert f"reading {fifo}" in report, report


def test_a_sigusr2_from_outside_is_a_stop_signal_and_a_late_watchdog_signal_is_not():
    """The watchdog takes SIGUSR2 over from the stop-signal handler: one it did not send (SLURM, scancel)
    stops the run; its own, arriving just after the batch came, ends nothing."""
    import signal

    from acon.data.watchdog import BatchWait
    from acon.preempt import PreemptionFlag

    flag = PreemptionFlag().install()
    waiter = BatchWait(flag, timeout_s=60.0).install()
    try:
        waiter._sent += 1  # as the watchdog does right before it signals
        os.kill(os.getpid(), signal.SIGUSR2)
        assert not flag and waiter._seen == waiter._sent
        assert waiter.next(iter([1, 2])) == 1  # nothing pending: batches still come
        os.kill(os.getpid(), signal.SIGUSR2)  # from outside
        assert flag.received == "SIGUSR2" and waiter.next(iter([3])) is None and waiter.ended == "SIGUSR2"
    finally:
        waiter.restore()
        flag.restore()
