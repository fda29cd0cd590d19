"""A full (or read-only, over-quota, forbidden) run dir: one error line, exit 4, last.pt intact, resumable."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides
from refusing_writes import refusing

from acon.checkpoint import atomic_copy, atomic_save, load_checkpoint
from acon.logging import RunLogger
from acon.report import write_json
from acon.storage import WRITE_EXIT_CODE, WriteFailed, free_bytes, human, space_shortfall

ERRNOS = ["ENOSPC", "EDQUOT", "EROFS", "EACCES"]
CAUSES = {
    "ENOSPC": "no space left on device",
    "EDQUOT": "disk quota exceeded",
    "EROFS": "read-only file system",
    "EACCES": "permission denied",
}


@pytest.fixture
def refuse_writes(monkeypatch):
    """``refuse_writes(glob, "ENOSPC", let_through=0)``: writes to matching file names fail from then on."""

    def install(pattern: str, name: str, let_through: int = 0) -> None:
        fake_open, fake_link = refusing(pattern, getattr(errno, name), let_through)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "link", fake_link)

    return install


def assert_names(e: WriteFailed, path: Path, name: str) -> None:
    msg = str(e)
    assert f"cannot write {path}: {CAUSES[name]} ({name})" in msg, msg
    assert "needs about" in msg and "free there" in msg and "rerun the same command" in msg, msg


@pytest.mark.parametrize("name", ERRNOS)
def test_checkpoint_write_refused_keeps_previous_and_no_temp(tmp_path, refuse_writes, name):
    path = tmp_path / "last.pt"
    atomic_save({"step": torch.tensor(1), "w": torch.zeros(1000)}, path)
    refuse_writes(".last.pt.tmp*", name)
    with pytest.raises(WriteFailed) as info:
        atomic_save({"step": torch.tensor(2), "w": torch.zeros(1000)}, path)
    assert_names(info.value, path, name)
    assert "needs about 3.9 KiB" in str(info.value)  # the tensors' bytes
    assert load_checkpoint(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("name", ERRNOS)
def test_checkpoint_copy_refused_leaves_no_temp(tmp_path, refuse_writes, name):
    last = atomic_save({"step": torch.tensor(3)}, tmp_path / "last.pt")
    refuse_writes(".best.pt.tmp*", name)
    with pytest.raises(WriteFailed) as info:
        atomic_copy(last, tmp_path / "best.pt")
    assert_names(info.value, tmp_path / "best.pt", name)
    assert f"needs about {human(last.stat().st_size)}" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("name", ERRNOS)
def test_results_json_refused_keeps_previous(tmp_path, refuse_writes, name):
    path = write_json(tmp_path / "results.json", {"status": "complete"})
    refuse_writes(".results.json.tmp*", name)
    with pytest.raises(WriteFailed) as info:
        write_json(path, {"status": "stopped"})
    assert_names(info.value, path, name)
    assert json.loads(path.read_text()) == {"status": "complete"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("name", ERRNOS)
def test_metrics_jsonl_refused(tmp_path, refuse_writes, name):
    logger = RunLogger(tmp_path, True, 0, [{"epoch": 1}])
    refuse_writes("metrics.jsonl", name)
    with pytest.raises(WriteFailed) as info:
        logger.epoch_line({"epoch": 2})
    assert_names(info.value, tmp_path / "metrics.jsonl", name)
    with pytest.raises(WriteFailed):
        RunLogger(tmp_path, True, 3, [{"epoch": 1}])  # the rewrite after a resume


def scalars_until_refused(logger: RunLogger) -> None:
    """TensorBoard writes from a thread: the error comes with a later call or the close."""
    for step in range(50):
        logger.scalars(step, {"train/loss": 1.0})
        time.sleep(0.01)
    logger.close()


@pytest.mark.parametrize("name", ERRNOS)
def test_tensorboard_refused_raises(tmp_path, refuse_writes, name):
    refuse_writes("events.out.tfevents*", name)
    logger = RunLogger(tmp_path, True)
    with pytest.raises(WriteFailed) as info:
        scalars_until_refused(logger)
    assert f"cannot write {tmp_path / 'tb'}" in str(info.value) and f"({name})" in str(info.value)


def test_tensorboard_refused_warns_once_and_metrics_go_on(tmp_path, refuse_writes, caplog):
    refuse_writes("events.out.tfevents*", "ENOSPC")
    logger = RunLogger(tmp_path, True, tensorboard_errors="warn")
    with caplog.at_level("WARNING", logger="acon"):
        scalars_until_refused(logger)
        logger.epoch_line({"epoch": 1})
        logger.scalars(99, {"train/loss": 1.0})
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard stopped" in r.getMessage()]
    assert len(warnings) == 1 and "ENOSPC" in warnings[0] and "tensorboard_errors=warn" in warnings[0]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_free_space_warning_names_both_numbers(tmp_path):
    assert space_shortfall(tmp_path, 1 << 20, 3) is None  # 67 MiB: the test machine has it
    warning = space_shortfall(tmp_path, 1 << 50, 3)
    free = human(free_bytes(tmp_path))
    assert f"{free} free for {tmp_path}, below the 3072.0 TiB the run keeps" in warning, warning
    assert "3 checkpoints of about 1024.0 TiB + 64.0 MiB margin" in warning and "exit status 4" in warning


@pytest.mark.parametrize(
    "pattern", ["metrics.jsonl", ".results.json.tmp*", "events.out.tfevents*", ".step_*.pt.tmp*"]
)
def test_training_stops_at_each_write_site_with_last_checkpoint_intact(
    tiny_imagenet, tmp_path, refuse_writes, pattern, one_thread
):
    """In-process runs: the refusal leaves train() as WriteFailed; last.pt loads, no temp file remains."""
    from acon.trainer import train

    cfg = compose(
        tiny_overrides(tiny_imagenet, tmp_path, steps=4)
        + ["model=shufflenetv2_x0_5_small", "activation=relu", "run_name=r", "trainer.threads=1"]
        + ["data.img_size=16", "data.val_transform.resize=18", "trainer.ckpt_every_steps=2"]
        + ["trainer.keep_step_checkpoints=1"]
    )
    refuse_writes(pattern, "ENOSPC", let_through=1 if pattern == "metrics.jsonl" else 0)
    with pytest.raises(WriteFailed, match="no space left on device"):
        train(cfg)
    run = tmp_path / "r"
    assert load_checkpoint(run / "last.pt")["progress"]["step"] in (2, 4)
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    assert (run / "acon.lock").read_text() == ""  # the lock was released


def train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        *tiny_overrides(root, out),
        "model=shufflenetv2_x0_5_small",
        "activation=relu",
        "data.num_workers=2",
        "data.img_size=16",
        "data.val_transform.resize=18",
        "recipe.epochs=2",
        "trainer.threads=1",
        "run_name=r",
        *extra,
    ]


def run(args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def assert_clean_stop(proc: subprocess.CompletedProcess, what: str) -> None:
    """Exit 4 with exactly one ``error:`` line naming ``what``, and no traceback or worker crash."""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == WRITE_EXIT_CODE, proc.stderr
    assert len(errors) == 1 and what in errors[0] and "free there" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "killed by signal" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("persistent", [False, True])
def test_full_disk_mid_run_exits_4_with_one_line_and_no_crash_at_exit(tiny_imagenet, tmp_path, persistent):
    """A real process with 2 DataLoader workers: the second checkpoint write fails with ENOSPC (the
    rerun that resumes after space is freed: the slow tmpfs test below). The workers are shut down in
    order on the way out: left to the cycle collector (the error's frames hold the epoch's iterator, and
    the trainer the persistent one), each would cost a 5 s join and a 5 s wait after a terminate it ignores,
    before the error line (the run itself takes about 5 s)."""
    env = {"PYTHONPATH": str(ROOT / "tests" / "inject"), "ACON_REFUSE_WRITES": ".last.pt.tmp*=ENOSPC@1"}
    t0 = time.monotonic()
    proc = run(train_cmd(tiny_imagenet, tmp_path, f"data.persistent_workers={str(persistent).lower()}"), env)
    assert time.monotonic() - t0 < 15, "the workers' shutdown waited out its timeouts"
    run_dir = tmp_path / "r"
    assert_clean_stop(proc, f"cannot write {run_dir / 'last.pt'}: no space left on device (ENOSPC)")
    assert load_checkpoint(run_dir / "last.pt")["progress"]["step"] == 6  # the first epoch's save
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 9 MiB tmpfs (root only); skipped where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_real_full_filesystem_stops_cleanly_and_resumes_after_space_is_freed(tiny_imagenet, small_tmpfs):
    """The default-size run on a 9 MiB filesystem keeping step checkpoints: it fills mid-run."""
    args = train_cmd(
        tiny_imagenet, small_tmpfs, "trainer.keep_step_checkpoints=5", "trainer.ckpt_every_steps=2"
    )
    proc = run(args)
    run_dir = small_tmpfs / "r"
    assert "below the" in proc.stdout + proc.stderr  # the free-space warning before the first step
    assert_clean_stop(proc, f"cannot write {run_dir}/")
    assert "no space left on device (ENOSPC)" in proc.stderr
    step = load_checkpoint(run_dir / "last.pt")["progress"]["step"]
    assert 0 < step < 12 and not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
    remount = ["mount", "-o", "remount,size=40m", str(small_tmpfs)]  # space freed
    subprocess.run(remount, check=True)
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {run_dir / 'last.pt'} at step {step}" in again.stdout + again.stderr
    assert json.loads((run_dir / "results.json").read_text())["status"] == "complete"


@pytest.fixture
def nearly_full(monkeypatch):
    """The filesystem reports 5 MiB free (through shutil.disk_usage, which every free-space check asks)."""
    real = shutil.disk_usage

    def small(path):
        usage = real(path)
        return usage._replace(free=5 << 20)

    monkeypatch.setattr(shutil, "disk_usage", small)


def test_trainer_and_doctor_warn_before_the_first_step_with_both_numbers(
    tiny_imagenet, tmp_path, nearly_full, caplog, one_thread
):
    from acon.doctor.system import check_disk_and_resume
    from acon.trainer import train

    overrides = tiny_overrides(tiny_imagenet, tmp_path, steps=1) + [
        "model=shufflenetv2_x0_5_small",
        "activation=relu",
        "run_name=r",
        "trainer.keep_step_checkpoints=2",
    ]
    cfg = compose(overrides)
    (check,) = [c for c in check_disk_and_resume(cfg) if c.name == "disk for this run"]
    assert check.status == "warn" and "5.0 MiB free for" in check.detail, check
    assert "4 checkpoints of about" in check.detail and "below the" in check.detail, check
    with caplog.at_level("INFO", logger="acon"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records]
    (warning,) = [i for i, m in enumerate(lines) if "5.0 MiB free for" in m and "4 checkpoints of about" in m]
    banner = next(i for i, m in enumerate(lines) if "steps" in m)
    assert warning < banner  # before training starts


@pytest.mark.slow
def test_ddp_full_disk_stops_every_rank_with_one_line(tiny_imagenet, tmp_path):
    """torchrun, 2 gloo ranks: rank 0's refused checkpoint write ends both ranks promptly, one line."""
    env = {"PYTHONPATH": str(ROOT / "tests" / "inject"), "ACON_REFUSE_WRITES": ".last.pt.tmp*=ENOSPC@1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0"]
    args = train_cmd(tiny_imagenet, tmp_path, "recipe.batch_size=8", "data.num_workers=0")
    t0 = time.monotonic()
    proc = run([args[0], *launcher, *args[1:]], env, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and time.monotonic() - t0 < 200, proc.stderr[-3000:]
    assert len(errors) == 1 and "no space left on device (ENOSPC)" in errors[0], proc.stderr[-3000:]
    assert proc.stderr.count("exitcode  : 4 ") == 2, proc.stderr[-3000:]  # both ranks, torchrun's report
    assert load_checkpoint(tmp_path / "r" / "last.pt")["progress"]["step"] == 3  # 3 steps an epoch at 8


@pytest.mark.slow
@pytest.mark.parametrize(
    "pattern, what",
    [
        ("metrics.jsonl", "metrics.jsonl"),
        ("events.out.tfevents*", "events.out.tfevents"),
        (".results.json.tmp*", "results.json"),
    ],
    ids=["metrics", "tensorboard", "results"],
)
def test_ddp_refused_log_write_on_rank0_ends_every_rank_with_exit_4(tiny_imagenet, tmp_path, pattern, what):
    """torchrun, 2 gloo ranks: a metrics.jsonl, TensorBoard or results.json write refused on rank 0 (the
    only rank that writes them) ends both ranks promptly with exit 4 and rank 0's one line; the others
    learn of it at the next step's flag sum, save or the run's end, not through a dead rank (before:
    rank 1 crashed in a collective, or ended 0 beside rank 0's 4)."""
    refuse = f"{pattern}=ENOSPC@1" if pattern == "metrics.jsonl" else f"{pattern}=ENOSPC"
    env = {"PYTHONPATH": str(ROOT / "tests" / "inject"), "ACON_REFUSE_WRITES": refuse}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0"]
    args = train_cmd(
        tiny_imagenet, tmp_path, "recipe.batch_size=8", "data.num_workers=0", "trainer.log_every=1"
    )
    t0 = time.monotonic()
    proc = run([args[0], *launcher, *args[1:]], env, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and time.monotonic() - t0 < 200, proc.stderr[-3000:]
    assert len(errors) == 1 and what in errors[0] and "no space left on device (ENOSPC)" in errors[0], (
        proc.stderr[-3000:]
    )
    assert proc.stderr.count("exitcode  : 4 ") == 2, proc.stderr[-3000:]  # both ranks, torchrun's report
    assert "RuntimeError" not in proc.stderr and "closed by peer" not in proc.stderr, proc.stderr[-3000:]
    if pattern == "metrics.jsonl":  # refused after the first epoch's validation: no checkpoint at step 3
        assert load_checkpoint(tmp_path / "r" / "last.pt")["progress"]["step"] < 6


def test_held_refusals_raise_at_once_alone_and_are_held_under_ddp(tmp_path, refuse_writes):
    """Without DDP a refused write raises where it happens; held (DDP), it is kept for the next agreement
    and the writes after it are skipped."""
    from acon.storage import HeldRefusals

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    refuse_writes("metrics.jsonl", "ENOSPC", let_through=1)
    alone = HeldRefusals(lambda: RunLogger(tmp_path / "a", True), hold=False)
    with pytest.raises(WriteFailed, match="metrics.jsonl"):
        alone.epoch_line({"epoch": 1})
    refuse_writes("metrics.jsonl", "ENOSPC", let_through=0)
    held = HeldRefusals(lambda: RunLogger(tmp_path / "b", True), hold=True)  # its first write is refused
    assert isinstance(held.failure, WriteFailed) and "metrics.jsonl" in str(held.failure)
    assert held.epoch_line({"epoch": 1}) is None and held.failure is not None
