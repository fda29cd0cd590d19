"""A stuck validation loader on real processes: the read of one validation image never returns (as a read
from a hung file system; injected by ``tests/hanging_reads.py``), which blocks a validation loader worker. trainer.data_timeout_s
ends the run, and so does a stop signal to the process group; the checkpoint saved before the validation
stays as it was, and the same command, with the file readable again, validates there and completes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_fault_checkpoints import descendants, reap, start, wait_for
from test_rundir_disk import train_cmd

from acon.checkpoint import load_checkpoint
from acon.preempt import REQUEUE_EXIT_CODE

RUN = "r"
STEPS = 6  # 24 training images, batch 4: one epoch, then the validation


def hung(image: Path) -> dict:
    """The environment in which reading ``image`` never returns (``tests/hanging_reads.py``)."""
    return {"SLURM_JOB_ID": "", "PYTHONPATH": str(ROOT / "tests" / "inject"), "ACON_HANG_READS": image.name}


@pytest.fixture
def val_image(tiny_imagenet) -> Path:
    """The validation image whose read hangs."""
    return sorted((tiny_imagenet / "val").rglob("*.JPEG"))[0]


def cmd(root: Path, out: Path, *extra: str) -> list[str]:
    """One epoch of a tiny run (6 steps) with one loader worker; validation after its last step."""
    return train_cmd(root, out, "data.num_workers=1", "recipe.epochs=1", *extra)


def reading(proc, path: Path) -> bool:
    """True while some process of the run holds ``path`` open (the validation worker waits on it)."""
    for pid in descendants(proc.pid):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd")):
                return True
        except OSError:
            continue
    return False


def finish(args: list[str], run_dir: Path) -> None:
    """The same command, the file readable again, completes from the saved checkpoint, validating at the
    step where it stopped."""
    proc = start(args, env={"SLURM_JOB_ID": ""})
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        reap(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "took over" not in err, err[-3000:]  # the stopped run released the lock before its exit
    assert f"resumed from step {STEPS} ({run_dir / 'last.pt'})" in out + err, (out + err)[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == STEPS
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [STEPS] and "val_top1_err" in records[0]


@pytest.mark.slow
def test_data_timeout_ends_a_stuck_validation_naming_the_file(val_image, tiny_imagenet, tmp_path):
    """Before: the validation waited for the hung read forever, whatever trainer.data_timeout_s said."""
    image = val_image
    run_dir, args = tmp_path / RUN, cmd(tiny_imagenet, tmp_path, "trainer.data_timeout_s=2")
    proc = start(args, env=hung(image))
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        reap(proc)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    lines = [ln for ln in err.splitlines() if "data_timeout_s" in ln]
    assert len(lines) == 1, err[-3000:]
    assert "no validation batch within trainer.data_timeout_s=2 s" in lines[0], lines
    assert f"reading {image}" in lines[0] and "exiting with status 75" in lines[0], lines
    assert f"at step {STEPS}; last.pt holds that step" in lines[0], lines
    assert "Traceback" not in err, err[-3000:]
    assert load_checkpoint(run_dir / "last.pt")["progress"]["step"] == STEPS
    assert lines[0].split("acon: ", 1)[1] in (run_dir / "train.log").read_text()
    finish(args, run_dir)


@pytest.mark.slow
def test_group_sigterm_during_a_stuck_validation_exits_75_keeps_last_pt(val_image, tiny_imagenet, tmp_path):
    """No timeout set: SIGTERM to the group ends the stuck validation at once; last.pt (saved before the
    validation) is not rewritten (the slow test above reruns such a stop to completion)."""
    image = val_image
    run_dir, args = tmp_path / RUN, cmd(tiny_imagenet, tmp_path)
    proc = start(args, env=hung(image))
    try:
        assert wait_for(lambda: reading(proc, image), proc, poll=0.05), proc.communicate()[1][-3000:]
        saved = (run_dir / "last.pt").read_bytes()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)  # before: waits forever
    finally:
        reap(proc)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert (
        f"received SIGTERM during the validation at step {STEPS}; last.pt holds that step: checkpoint saved, "
        "exiting with status 75"
    ) in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert (run_dir / "last.pt").read_bytes() == saved
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip()


def test_a_validation_pass_through_the_wait_ends_early_on_the_timeout(tmp_path):
    """In-process, a real loader with 2 workers whose item 1 hangs in a read: the pass through
    :class:`WaitedLoader` ends after the timeout as if the loader had run out, saying why; a stop signal
    that already arrived ends the next pass before its first batch, except the run's last validation."""
    from test_fault_stalled_loader import _HangsOnARead

    from acon.data.watchdog import BatchWait, WaitedLoader
    from acon.preempt import PreemptionFlag, worker_ignores_stop_signals

    fifo = tmp_path / "hung.JPEG"
    os.mkfifo(fifo)
    loader = torch.utils.data.DataLoader(
        _HangsOnARead(str(fifo)), batch_size=1, num_workers=2, worker_init_fn=worker_ignores_stop_signals
    )
    flag = PreemptionFlag()
    val = WaitedLoader(loader, BatchWait(flag, timeout_s=1.0).install())
    try:
        t0 = time.monotonic()
        assert [b.item() for b in val] == [0.0] and val.ended == "timeout"
        assert time.monotonic() - t0 < 10
        assert len(val) == 8 and val.dataset is loader.dataset
    finally:
        val.wait.restore()
        with open(fifo, "wb") as unblock:
            unblock.write(b"x")
        val.iterator = None
    flag._handle(signal.SIGTERM, None)  # a stop signal outside any wait: pending
    assert list(val) == [] and val.ended == "SIGTERM"
    last = WaitedLoader([1, 2, 3], BatchWait(flag, None), finish_pending=True)  # the run's last validation
    assert list(last) == [1, 2, 3] and last.ended is None


@pytest.mark.slow
def test_ddp_a_validation_stalled_on_one_rank_stops_every_rank(val_image, tiny_imagenet, tmp_path):
    """torchrun, 2 gloo ranks: the hung image is in one rank's validation shard; the other rank's pass
    ends and waits in the task's collectives, the stalled one's after trainer.data_timeout_s; both then
    stop at the same step with one line naming the stuck rank, and last.pt is the pre-validation save."""
    run_dir = tmp_path / RUN
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0"]
    args = cmd(tiny_imagenet, tmp_path, "trainer.data_timeout_s=3", "recipe.batch_size=8")
    proc = start([args[0], *launcher, *args[1:]], env=hung(val_image))
    try:
        _, err = proc.communicate(timeout=180)  # before: the stalled rank waited forever
    finally:
        reap(proc)
    assert proc.returncode != 0, err[-3000:]
    lines = [ln for ln in err.splitlines() if "no validation batch within" in ln]
    assert len(lines) == 1 and "exiting with status 75" in lines[0], err[-3000:]
    assert f"reading {val_image}" in lines[0] and "rank " in lines[0], lines
    assert "RuntimeError" not in err and "closed by peer" not in err, err[-3000:]  # no rank crashed
    state = load_checkpoint(run_dir / "last.pt")
    assert state["world_size"] == 2 and state["progress"]["step"] == 3  # 24 images, global batch 8
