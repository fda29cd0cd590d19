"""Preemption signals and dead ranks on real processes: save at a step boundary, exit 75, resume."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides
from test_fault_checkpoints import (
    descendants,
    group_signals_then_bit_exact_resume,
    overrides,
    reap,
    start,
    wait_for,
)

from acon.checkpoint import load_checkpoint
from acon.preempt import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, PreemptionFlag, requeue_and_exit

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


@pytest.mark.parametrize(
    "sig", [pytest.param("SIGTERM", marks=pytest.mark.slow), pytest.param("SIGUSR1", marks=pytest.mark.slow)]
)
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


@pytest.mark.slow  # long; torchrun's launch and a rank's death stay in test_dead_rank_ends_whole_job_quickly
def test_torchrun_restart_resumes_from_last_checkpoint(tiny_imagenet, tmp_path):
    run_dir = tmp_path / RUN
    proc = start(torchrun(tiny_imagenet, tmp_path, 30, restarts=1))
    try:
        kill_rank_when_running(proc, run_dir)
        out, err = proc.communicate(timeout=400)
    finally:
        reap(proc)
    assert proc.returncode == 0, err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == 30 and results["world_size"] == 2
    # the resume point is a log line (console on stdout, and the run's train.log)
    resumed = [line for line in out.splitlines() if "acon: resuming from" in line]
    assert resumed and "at step 0 " not in resumed[0], err[-3000:]  # restarted from a saved step
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, len(log) + 1))  # no epoch lost or repeated


def write_shards(src: Path, dst: Path, per_shard: int = 4) -> Path:
    """``src``'s train/ and val/ as shards (24 train images: 6 shards, 3 for each of 2 workers)."""
    from acon.data.folder import ImageFolderDataset
    from acon.data.shards import ShardWriter

    for split in ("train", "val"):
        ds = ImageFolderDataset(src / split, loader=lambda p: Path(p).read_bytes())
        writer = ShardWriter(dst, split, per_shard)
        for i, (data, label) in enumerate(ds):
            writer.write(f"{split}{i:04d}", data, label)
        writer.close(ds.classes)
    return dst


def pipeline_root(pipeline: str, tiny_imagenet: Path, tmp_path: Path) -> Path:
    return write_shards(tiny_imagenet, tmp_path / "shards") if pipeline == "shards" else tiny_imagenet


@pytest.mark.parametrize("pipeline", ["reference", "fast", pytest.param("shards", marks=pytest.mark.slow)])
def test_loader_workers_of_each_cpu_pipeline_ignore_stop_signals(tiny_imagenet, tmp_path, pipeline):
    """The trainer's training loader with 2 workers: SIGTERM, SIGINT and SIGUSR1 sent to the workers (as
    a group-wide signal does) leave them running, and the epoch completes."""
    from acon.data import build_datasets, build_train_loader
    from acon.data.build import build_pipeline_loaders

    root = pipeline_root(pipeline, tiny_imagenet, tmp_path)
    cfg = compose(tiny_overrides(root, tmp_path) + [f"data.pipeline={pipeline}", "data.num_workers=2"])
    if pipeline == "reference":
        loader = build_train_loader(build_datasets(cfg.data)[0], cfg.data, 4, 0, 1, 0)
    else:
        loader = build_pipeline_loaders(cfg.data, 4, 4, 0, 1, 0, torch.device("cpu"))[0]
    before = set(descendants(os.getpid()))
    batches = iter(loader)
    # batches come round-robin: the second is worker 1's, so both workers have run their worker_init_fn
    # (a signal before it meets this process's dispositions: in a run, the trainer's flag-only handlers)
    next(batches), next(batches)
    workers = set(descendants(os.getpid())) - before
    assert len(workers) == 2, workers
    for pid in workers:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            os.kill(pid, sig)
    time.sleep(0.2)
    assert 2 + len(list(batches)) == 6  # before: "DataLoader worker (pid …) is killed by signal"
    assert all(Path(f"/proc/{pid}").exists() for pid in workers)  # persistent workers, still alive
    del batches, loader  # the workers end here, not whenever a later test happens to collect them
    gc.collect()


@pytest.mark.parametrize("pipeline", ["reference", "fast"])
def test_a_dropped_loader_is_freed_without_the_cycle_collector(
    tiny_imagenet, tmp_path, pipeline, no_cycle_collector
):
    """The loader builders leave no reference cycle holding their loaders: dropped, a loader is freed at once.
    (Left to the cycle collector, persistent workers are shut down out of order: their queues are finalised
    first, so each worker costs a 5 s join and a terminate that it ignores, and stays.)"""
    from acon.data import build_datasets, build_train_loader
    from acon.data.build import build_pipeline_loaders

    cfg = compose(
        tiny_overrides(tiny_imagenet, tmp_path) + [f"data.pipeline={pipeline}", "data.num_workers=2"]
    )
    if pipeline == "reference":
        loader = build_train_loader(build_datasets(cfg.data)[0], cfg.data, 4, 0, 1, 0)
    else:
        loader = build_pipeline_loaders(cfg.data, 4, 4, 0, 1, 0, torch.device("cpu"))[0]
    alive = weakref.ref(loader)
    del loader
    assert alive() is None, gc.get_referrers(alive())


def test_ctrl_c_sets_the_flag_a_second_one_interrupts_and_exit_is_130(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", "/nonexistent")  # a requeue attempt would fail loudly
    flag = PreemptionFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert flag.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        flag.restore()
    with pytest.raises(SystemExit) as stop:
        requeue_and_exit("received SIGINT", True, "SIGINT")
    assert stop.value.code == INTERRUPT_EXIT_CODE == 130
    assert "could not requeue" not in capsys.readouterr().err  # Ctrl-C asks for no requeue


@pytest.fixture(scope="module")
def pipeline_references(tiny_imagenet, tmp_path_factory) -> dict:
    """Uninterrupted runs (last.pt) of the fast and shards pipelines with 2 workers, made on first use."""
    from acon.trainer import train

    made = {}

    def get(pipeline: str, root: Path) -> dict:
        if pipeline not in made:
            out = tmp_path_factory.mktemp(f"ref_{pipeline}")
            train(compose(overrides(root, out) + [f"data.pipeline={pipeline}", "data.num_workers=2"]))
            made[pipeline] = load_checkpoint(out / "r" / "last.pt")
        return made[pipeline]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["fast", "shards"])
def test_group_signals_with_workers_on_the_other_cpu_pipelines(
    tiny_imagenet, tmp_path, pipeline, pipeline_references
):
    """SIGTERM then SIGINT to the process group of a run with 2 workers, then bit-exact resume."""
    root = pipeline_root(pipeline, tiny_imagenet, tmp_path)
    reference = pipeline_references(pipeline, root)
    extra = (f"data.pipeline={pipeline}", "data.num_workers=2")
    group_signals_then_bit_exact_resume(root, tmp_path, reference, ("SIGTERM", "SIGINT"), *extra)


def test_process_exits_with_live_workers_that_ignore_stop_signals():
    """A loader whose workers ignore SIGTERM and was never shut down must not hold the interpreter's exit."""
    code = (
        "import torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from acon.preempt import worker_ignores_stop_signals\n"
        "loader = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=2,\n"
        "                    persistent_workers=True, worker_init_fn=worker_ignores_stop_signals)\n"
        "it = iter(loader); next(it); KEEP = [it]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_worker_excepthook_drops_only_a_hung_up_consumer():
    """A loader worker whose fd handshake the stopping main process cut short prints nothing; any other
    error still reaches the previous hook (the group-signal test catches the traceback in a real run)."""
    from acon.preempt import _quiet_when_the_consumer_hangs_up

    seen = []
    hook = _quiet_when_the_consumer_hangs_up(lambda kind, value, tb: seen.append(kind))
    hook(ConnectionResetError, ConnectionResetError(104, "reset"), None)
    hook(EOFError, EOFError(), None)
    hook(ValueError, ValueError("real"), None)
    assert seen == [ValueError]
