"""Crash safety: atomic checkpoints, kill -9 at random points (some during saves), bit-exact resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides

import acon.checkpoint as ckpt
from acon.checkpoint import atomic_save, load_checkpoint

RUN = "r"


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start a command from the repo root in its own session (so it can be cleaned up as a group)."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        args, cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def reap(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process it started (they may sit in other sessions), then wait."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.communicate(timeout=30)
    except (subprocess.TimeoutExpired, ValueError):
        pass


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.0005) -> bool:
    """Poll ``cond()`` until true; False if ``proc`` exits first or on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        time.sleep(poll)
    return False


def train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    """The deterministic CPU run used for kill/resume tests (12 steps, a save after every step)."""
    return [sys.executable, "train.py", *overrides(root, out), *extra]


def overrides(root: Path, out: Path) -> list[str]:
    return tiny_overrides(root, out) + [
        "model=shufflenetv2_x0_5_small",
        "activation=relu",
        "recipe.epochs=2",
        "deterministic=true",
        "trainer.threads=1",
        "trainer.ckpt_every_steps=1",
        "trainer.keep_step_checkpoints=2",
        f"run_name={RUN}",
    ]


def saving(run_dir: Path):
    """True while a checkpoint temp file exists, i.e. a save is in progress."""

    def cond() -> bool:
        try:
            return any(n.startswith(".") and ".tmp" in n for n in os.listdir(run_dir))
        except FileNotFoundError:
            return False

    return cond


def assert_loadable(run_dir: Path) -> int:
    """last.pt and every step checkpoint load and hold finite weights; returns last.pt's step."""
    state = load_checkpoint(run_dir / "last.pt")
    for f in run_dir.glob("step_*.pt"):
        assert load_checkpoint(f)["progress"]["step"] == int(f.stem.split("_")[1])
    return state["progress"]["step"]


@pytest.fixture(scope="module")
def reference(tiny_imagenet, tmp_path_factory) -> dict:
    """An uninterrupted run's final checkpoint."""
    from acon.trainer import train

    out = tmp_path_factory.mktemp("ref")
    train(compose(overrides(tiny_imagenet, out)))
    return load_checkpoint(out / RUN / "last.pt")


def kill_and_resume(root: Path, out: Path, plan: list[str], rng: random.Random) -> list[int]:
    """Run, SIGKILL per ``plan`` ("save": while a save is in progress, "random": at a random moment), and
    resume each time with the same command; returns last.pt's step after each kill."""
    run_dir, steps = out / RUN, []
    for how in plan:
        proc = start(train_cmd(root, out))
        try:
            before = (run_dir / "last.pt").stat().st_mtime_ns if (run_dir / "last.pt").exists() else 0

            def progressed(b: int = before) -> bool:
                last = run_dir / "last.pt"
                return last.exists() and last.stat().st_mtime_ns != b

            assert wait_for(progressed, proc), proc.communicate()[1][-3000:]
            if how == "save":
                assert wait_for(saving(run_dir), proc), "no save in progress was seen"
            else:
                time.sleep(rng.uniform(0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it was killed"
        finally:
            reap(proc)
        steps.append(assert_loadable(run_dir))
    return steps


def finish_and_compare(root: Path, out: Path, reference: dict, *extra: str) -> None:
    """Rerun the same command to completion: final weights are bit-identical to the uninterrupted run."""
    proc = start(train_cmd(root, out, *extra))
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        reap(proc)
    assert proc.returncode == 0, err[-3000:]
    final = load_checkpoint(out / RUN / "last.pt")
    assert final["progress"]["step"] == reference["progress"]["step"] == 12
    for k, v in reference["model"].items():
        assert torch.equal(v, final["model"][k]), k
    for key, va in reference["optimizer"]["state"].items():
        assert torch.equal(va["momentum_buffer"], final["optimizer"]["state"][key]["momentum_buffer"]), key
    assert (out / RUN / "results.json").is_file()
    assert sorted(p.name for p in (out / RUN).glob("step_*.pt")) == ["step_11.pt", "step_12.pt"]
    assert not list((out / RUN).glob(".*.tmp*"))  # temp files of killed saves are cleaned on restart


def test_kill9_during_save_and_at_random_then_bit_exact_resume(tiny_imagenet, tmp_path, reference):
    steps = kill_and_resume(tiny_imagenet, tmp_path, ["save", "random"], random.Random(0))
    assert 0 < steps[0] <= steps[1] < 12, steps
    finish_and_compare(tiny_imagenet, tmp_path, reference)


def modified_since(path: Path, mtime_ns: int):
    """True once ``path`` exists with another modification time than ``mtime_ns``."""
    return lambda: path.exists() and path.stat().st_mtime_ns != mtime_ns


def gone(pids: list[int], timeout: float = 15) -> bool:
    """Wait until none of ``pids`` is a live process (zombies count as gone)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = []
        for pid in pids:
            try:
                alive += (
                    [pid] if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" else []
                )
            except OSError:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def stop_group(args: list[str], run_dir: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start ``args``; once it has saved a step with its DataLoader workers running, send ``sig`` to its
    whole process group (as SLURM, scancel, timeout and Ctrl-C do). Returns (exit status, stderr)."""
    last = run_dir / "last.pt"
    before = last.stat().st_mtime_ns if last.exists() else 0
    proc = start(args)
    try:
        saved = modified_since(last, before)
        assert wait_for(lambda: saved() and len(descendants(proc.pid)) >= 2, proc), proc.communicate()[1][
            -3000:
        ]
        workers = descendants(proc.pid)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        reap(proc)
    assert gone(workers), "DataLoader workers outlived the main process"
    assert "Traceback" not in err, err[-3000:]
    return proc.returncode, err


def group_signals_then_bit_exact_resume(
    root: Path, out: Path, reference: dict, signals: tuple[str, ...], *extra: str
) -> None:
    """Send each of ``signals`` to the whole process group of a run (rerunning the same command after each
    stop), then rerun to the end: each stop saved a checkpoint and exited 75 (SIGTERM) or 130 (SIGINT),
    the final weights equal the uninterrupted run's, and wall_time_s sums every process's segment."""
    args, run_dir, stopped = train_cmd(root, out, *extra), out / RUN, []
    for name in signals:
        status = 130 if name == "SIGINT" else 75
        rc, err = stop_group(args, run_dir, getattr(signal, name))
        assert rc == status, err[-3000:]
        assert f"received {name}: checkpoint saved, exiting with status {status}" in err, err[-3000:]
        stopped.append(load_checkpoint(run_dir / "last.pt")["progress"]["step"])
        assert not (run_dir / "results.json").exists()
    assert 0 < stopped[0] and stopped == sorted(set(stopped)) and stopped[-1] < 12, stopped
    finish_and_compare(root, out, reference, *extra)
    segments = load_checkpoint(run_dir / "last.pt")["progress"]["wall_segments_s"]
    wall = json.loads((run_dir / "results.json").read_text())["wall_time_s"]
    assert len(segments) == len(signals) + 1 and min(segments) > 0, segments  # one per process
    assert wall == pytest.approx(sum(segments)), (wall, segments)


@pytest.mark.parametrize(
    "signals",
    [
        ("SIGTERM",),
        pytest.param(("SIGUSR2",), marks=pytest.mark.slow),  # default suite: the watchdog's unit test
        pytest.param(("SIGTERM", "SIGINT"), marks=pytest.mark.slow),
    ],
    ids="-".join,
)
def test_group_signal_with_workers_saves_and_resumes_bit_exact(tiny_imagenet, tmp_path, reference, signals):
    """The reference pipeline with 2 DataLoader workers (the other CPU pipelines: test_fault_preemption).
    SIGUSR2 (submitit's time-limit signal, ``scancel --signal=USR2``) is a stop signal too: before, it
    went to submitit's handler (requeue and exit mid-step, no checkpoint) or, outside submitit, killed
    the run and its workers."""
    group_signals_then_bit_exact_resume(tiny_imagenet, tmp_path, reference, signals, "data.num_workers=2")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill9_many_random_points(tiny_imagenet, tmp_path, reference, seed):
    rng = random.Random(seed)
    plan = [rng.choice(["save", "random"]) for _ in range(4)]
    steps = kill_and_resume(tiny_imagenet, tmp_path, plan, rng)
    assert steps == sorted(steps) and steps[-1] < 12, steps
    finish_and_compare(tiny_imagenet, tmp_path, reference)


def test_atomic_save_failure_mid_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": torch.tensor(1)}, path)

    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the temp file was removed


def test_step_checkpoints_pruned_only_after_new_one_is_safe(tiny_imagenet, tmp_path, monkeypatch):
    from acon.trainer import train

    real, seen = ckpt.prune_step_checkpoints, []

    def spy(folder, keep):
        files = sorted(folder.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        newest = load_checkpoint(files[-1])  # the new one is complete before anything is deleted
        seen.append((newest["progress"]["step"], [p.name for p in files]))
        real(folder, keep)

    monkeypatch.setattr(ckpt, "prune_step_checkpoints", spy)
    cfg = compose(
        tiny_overrides(tiny_imagenet, tmp_path, steps=4)
        + ["model=resnet18_small", "activation=relu", "run_name=p", "trainer.ckpt_every_steps=1"]
        + ["trainer.keep_step_checkpoints=1"]
    )
    train(cfg)
    assert [s for s, _ in seen] == [1, 2, 3, 4, 4]  # the last save at max_steps repeats step 4
    assert seen[1][1] == ["step_1.pt", "step_2.pt"]
    assert sorted(p.name for p in (tmp_path / "p").glob("step_*.pt")) == ["step_4.pt"]
    (tmp_path / "q").mkdir()
    for n in (9, 10, 100):
        (tmp_path / "q" / f"step_{n}.pt").write_bytes(b"x")
    real(tmp_path / "q", 2)
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["step_10.pt", "step_100.pt"]


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    from acon.checkpoint import remove_stale_temp_files

    (tmp_path / "last.pt").write_bytes(b"keep")
    dead, own = tmp_path / ".last.pt.tmp999999", tmp_path / f".best.pt.tmp{os.getpid()}"
    dead.write_bytes(b"partial")
    own.write_bytes(b"in progress")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert not dead.exists() and own.exists() and (tmp_path / "last.pt").exists()
