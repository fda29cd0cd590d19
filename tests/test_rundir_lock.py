"""One writer per run dir: a second process is refused at once (exit 2), the first completes with one
clean history, a kill -9 frees the dir, DDP ranks all stop, and readers only look."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose, tiny_overrides
from test_fault_checkpoints import reap, start, wait_for
from test_fault_preemption import worker_pids

from acon.checkpoint import load_checkpoint
from acon.runlock import LOCK_NAME, RunDirBusy, RunLock, running_holder
from acon.tables import collect

RUN = "r"
HOLD = (  # another process (on this or any host) holding a run dir's lock, as acon.runlock writes it
    "import fcntl, json, os, socket, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
    "os.write(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'started': 'T0'}).encode())\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def small(root: Path, out: Path, *extra: str) -> list[str]:
    """ShuffleNetV2 0.5x (ReLU) at 16 px, 2 epochs of 6 steps, a save every 2 steps."""
    return [
        *tiny_overrides(root, out),
        "model=shufflenetv2_x0_5_small",
        "activation=relu",
        "data.img_size=16",
        "data.val_transform.resize=18",
        "recipe.epochs=2",
        "trainer.threads=1",
        "trainer.ckpt_every_steps=2",
        f"run_name={RUN}",
        *extra,
    ]


@pytest.fixture
def hold():
    """``hold(run_dir)``: a separate process takes the run dir's lock; killed at the end."""
    procs = []

    def take(run_dir: Path) -> subprocess.Popen:
        run_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(run_dir / LOCK_NAME)], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield take
    for proc in procs:
        proc.kill()
        proc.wait()


def history(run_dir: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_second_process_is_refused_at_once_and_the_first_completes_one_history(tiny_imagenet, tmp_path):
    """A double submit: the first run is paused (SIGSTOP) while holding the dir; the same command and a
    ``resume=none`` one are refused with exit 2 before reading data; the first then completes."""
    run_dir, cmd = tmp_path / RUN, [sys.executable, "train.py", *small(tiny_imagenet, tmp_path)]
    first = start(cmd)
    try:
        assert wait_for(lambda: running_holder(run_dir) is not None, first, poll=0.05)
        assert wait_for(lambda: (run_dir / "last.pt").exists(), first, poll=0.01)
        first.send_signal(signal.SIGSTOP)
        rows = collect([tmp_path])[1]  # tables: the paused run is listed as running, not finished
        assert [r.reason.split(" (")[0] for r in rows] == ["running"] and f"pid {first.pid}" in rows[0].reason
        t0 = time.monotonic()
        seconds = (start(cmd),)  # resume=none is refused the same way: the in-process test below
        outs = [p.communicate(timeout=120) for p in seconds]
        took = time.monotonic() - t0
        for proc, (out, err) in zip(seconds, outs, strict=True):
            errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
            assert proc.returncode == 2, err
            assert len(errors) == 1 and f"run dir {run_dir} is in use by another run" in errors[0], err
            assert f"pid {first.pid}," in errors[0] and "started " in errors[0], errors
            assert "Traceback" not in err and str(tiny_imagenet) not in out + err  # no data was read
        assert took < 60, took  # an interpreter start on a loaded machine; the refusal itself is instant
        assert running_holder(run_dir)["pid"] == first.pid  # refusing did not disturb the holder
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=240)
    finally:
        reap(first)
    assert first.returncode == 0, err[-3000:]
    assert history(run_dir) == [1, 2]  # each epoch once
    assert json.loads((run_dir / "results.json").read_text())["status"] == "complete"
    assert running_holder(run_dir) is None and (run_dir / LOCK_NAME).read_text() == ""


def test_kill9_of_the_holder_lets_the_next_launch_take_the_dir(
    tiny_imagenet, tmp_path, hold, one_thread, capfd
):
    """The holder's entry stays behind, its lock dies with it (a real train.py killed: the slow torchrun
    test below)."""
    from acon.trainer import train

    run_dir = tmp_path / RUN
    holder = hold(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid  # its entry stays behind
    assert running_holder(run_dir) is None  # but the lock died with it
    results = train(compose(small(tiny_imagenet, tmp_path, "trainer.max_steps=2")))
    assert results is None and load_checkpoint(run_dir / "last.pt")["progress"]["step"] == 2
    err = capfd.readouterr().err
    assert f"took over {run_dir} from a run that ended without releasing it" in err, err
    assert f"pid {holder.pid}," in err and (run_dir / LOCK_NAME).read_text() == ""


def test_resume_none_in_a_locked_dir_is_refused_before_data_and_moves_nothing(
    tiny_imagenet, tmp_path, hold, monkeypatch
):
    import acon.trainer

    run_dir = tmp_path / RUN
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    holder = hold(run_dir)
    from acon.tasks.classification import ClassificationTask

    monkeypatch.setattr(
        ClassificationTask, "build_loaders", lambda *a, **k: pytest.fail("datasets were built")
    )
    for extra in ([], ["resume=none"]):
        with pytest.raises(RunDirBusy, match=f"run dir {run_dir} is in use by another run") as info:
            acon.trainer.train(compose(small(tiny_imagenet, tmp_path, *extra)))
        assert f"pid {holder.pid}, started T0" in str(info.value)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME, "metrics.jsonl"]


def test_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    run_dir = tmp_path / RUN
    run_dir.mkdir()
    stale = {"host": "elsewhere", "pid": 999999, "started": "T0"}
    (run_dir / LOCK_NAME).write_text(json.dumps(stale))
    assert running_holder(run_dir) is None  # readers: its lock is free
    lock = RunLock(run_dir).acquire()
    try:
        assert lock.previous == stale and running_holder(run_dir)["pid"] == lock.holder["pid"]
        with pytest.raises(RunDirBusy):  # this process again (a second trainer in it)
            RunLock(run_dir).acquire()
    finally:
        lock.release()
    assert (run_dir / LOCK_NAME).read_text() == "" and running_holder(run_dir) is None


def test_readers_never_take_the_lock_and_show_the_run_as_running(tmp_path, hold):
    """make_table and plot_curves read a run dir being written without disturbing its writer."""
    import importlib.util

    run_dir = tmp_path / "runs" / RUN
    run_dir.mkdir(parents=True)
    results = {"status": "complete", "model": "m", "activation": "relu", "seed": 0, "top1_err": 50.0}
    (run_dir / "results.json").write_text(json.dumps(results))  # e.g. a finished run being redone
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "val_top1_err": 50.0}\n')
    holder = hold(run_dir)
    runs, incomplete = collect([tmp_path / "runs"])
    assert runs == [] and len(incomplete) == 1 and incomplete[0].reason.startswith("running (host ")
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_table

    assert make_table.main([str(tmp_path / "runs"), "--out", str(tmp_path / "t"), "--no-hparams"]) == 0
    assert f"pid {holder.pid}" in (tmp_path / "t" / "table.md").read_text()
    spec = importlib.util.spec_from_file_location("plot_curves", ROOT / "scripts" / "plot_curves.py")
    plot_curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_curves)
    assert plot_curves.read_curve(run_dir) == {1: 50.0}
    assert running_holder(run_dir)["pid"] == holder.pid  # still held by its writer
    holder.kill()
    holder.wait()
    runs, incomplete = collect([tmp_path / "runs"])
    assert [r.path for r in runs] == [run_dir] and incomplete == []


def torchrun(root: Path, out: Path, restarts: int, *extra: str) -> list[str]:
    launcher = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
    ]
    return [sys.executable, *launcher, "train.py", *small(root, out, "recipe.batch_size=8", *extra)]


@pytest.mark.slow
def test_ddp_ranks_all_stop_when_rank0_is_refused(tiny_imagenet, tmp_path, hold):
    run_dir = tmp_path / RUN
    holder = hold(run_dir)
    t0 = time.monotonic()
    proc = subprocess.run(
        torchrun(tiny_imagenet, tmp_path, 0), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    took = time.monotonic() - t0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and took < 120, (took, proc.stderr[-3000:])
    assert len(errors) == 1 and f"pid {holder.pid}" in errors[0], proc.stderr[-3000:]  # rank 0's line only
    assert str(tiny_imagenet) not in proc.stdout


@pytest.mark.slow
def test_torchrun_restart_after_kill9_of_rank0_takes_the_lock_over(tiny_imagenet, tmp_path):
    run_dir = tmp_path / RUN
    proc = start(torchrun(tiny_imagenet, tmp_path, 1, "recipe.epochs=4"))
    try:
        assert wait_for(lambda: (run_dir / "last.pt").exists(), proc, poll=0.01)
        rank0 = worker_pids(proc.pid)[0]
        assert running_holder(run_dir)["pid"] == rank0
        import os

        os.kill(rank0, signal.SIGKILL)
        _, err = proc.communicate(timeout=400)
    finally:
        reap(proc)
    assert proc.returncode == 0, err[-3000:]
    assert f"took over {run_dir}" in err and f"pid {rank0}," in err
    assert history(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / "results.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_a_refused_second_process_changes_nothing_in_the_live_run_dir(tiny_imagenet, tmp_path):
    """Two real train.py processes, the same command: the refused second one leaves the first's .hydra/
    files and train.log byte for byte as they were (before: Hydra rewrote .hydra/ and the job log took
    lines before train() reached the lock)."""
    run_dir = tmp_path / RUN
    cmd = [sys.executable, "train.py", *small(tiny_imagenet, tmp_path, "recipe.epochs=50")]
    first = start(cmd)
    try:
        assert wait_for(lambda: running_holder(run_dir) is not None, first, poll=0.05)
        assert wait_for(lambda: (run_dir / "train.log").stat().st_size > 0, first, poll=0.05)
        first.send_signal(signal.SIGSTOP)  # nothing changes in its dir meanwhile
        kept = sorted((run_dir / ".hydra").iterdir()) + [run_dir / "train.log"]
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept}
        time.sleep(0.05)  # a rewrite with the same bytes would still move the mtime
        second = subprocess.run(
            [*cmd, "trainer.log_every=7"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2 and f"run dir {run_dir} is in use by another run" in second.stderr
        assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == before
    finally:
        reap(first)


def test_train_py_checks_the_lock_before_hydra_writes(tiny_imagenet, tmp_path, hold, monkeypatch):
    """The check train.py runs before Hydra starts refuses a job whose dir a live process holds, read-only:
    a single run, a sweep's job (hydra.sweep.dir/subdir), a hydra.run.dir given on the command line; DDP
    ranks other than 0 leave .hydra/ to rank 0."""
    from hydra import initialize_config_dir

    from acon.cli import CONFIGS
    from acon.runlock import check_before_hydra, hydra_argv

    cfg = compose(small(tiny_imagenet, tmp_path))
    holders = [hold(tmp_path / RUN), hold(tmp_path / "sweep" / RUN), hold(tmp_path / "elsewhere" / RUN)]
    monkeypatch.delenv("RANK", raising=False)
    commands = [
        ([f"run_name={RUN}"], holders[0]),
        (["-m", f"run_name={RUN}"], holders[1]),  # out_dir/sweep_name/run_name
        ([f"hydra.run.dir={tmp_path}/elsewhere/${{run_name}}"], holders[2]),
        (["-m", f"hydra.sweep.dir={tmp_path}/elsewhere"], holders[2]),
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for args, holder in commands:
            monkeypatch.setattr(sys, "argv", ["train.py", *args])
            with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
                check_before_hydra(cfg)
        for args in (
            ["-m", "hydra.sweep.dir=/nonexistent/free"],
            ["-m", "hydra.sweep.subdir=${hydra.job.num}"],
        ):
            monkeypatch.setattr(sys, "argv", ["train.py", *args])
            check_before_hydra(cfg)  # a free dir; a dir only Hydra's run knows is left to the lock
    assert sorted(p.name for p in (tmp_path / RUN).iterdir()) == [LOCK_NAME]
    assert hydra_argv(["train.py", "a=1"]) == ["train.py", "a=1"]
    monkeypatch.setenv("RANK", "1")
    assert hydra_argv(["train.py", "a=1"]) == ["train.py", "a=1", "hydra.output_subdir=null"]
