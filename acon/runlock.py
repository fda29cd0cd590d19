"""One writer per run dir: an exclusive OS lock on ``<run dir>/acon.lock`` and its holder written in it.

The lock is a POSIX record lock (``fcntl``): the kernel drops it when the process ends in any way
(``kill -9``, a crash, a lost node's lease on NFS), it is not inherited by forked DataLoader workers,
and NFS (NLM/NFSv4) and Lustre (mounted with ``-o flock``) forward it to the server, so it excludes
processes on other hosts too. The file names the holder (host, pid, start time) for the second
process's message and for readers (tables), which look at the lock (``F_GETLK``) without taking it.
A file whose lock is free is a dead run's: the next run takes it over. Where the filesystem has no
locks at all (``ENOLCK``, Lustre ``-o noflock``) only the file is left: a holder on this host is
checked by its pid; a holder on another host cannot be checked, and a warning says so. A requeued SLURM
job that finds its own previous run's lock still held (a lost node's NFS lease) waits for it to end.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from acon.storage import refused_writes

if TYPE_CHECKING:
    from omegaconf import DictConfig

LOCK_NAME = "acon.lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD: dict[str, RunLock] = {}  # run dirs this process holds (opening their lock file again would drop it)


class RunDirBusy(RuntimeError):
    """Another live run holds the run dir; the message names the dir and the holder."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), if readable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_process() -> dict:
    """Who holds a lock: host, pid, start time, the command line, and under SLURM the job and its run."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _proc_start(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        **_slurm_run(),
    }


EARLIER_RUN_WAIT_S = 300.0
"""How long a requeued SLURM job waits for the lock its own previous run still holds. SLURM starts a
requeued job only after its previous run ended, so such a lock is a lost node's: the file server keeps it
until that client's lease runs out (NFSv4: 90 s by default, plus the server's grace period)."""


def _slurm_run() -> dict:
    """This SLURM job and how many times it was requeued (``SLURM_RESTART_COUNT``); empty outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job, "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)} if job else {}


def earlier_run_of_this_job(holder: dict | None) -> bool:
    """Whether ``holder`` is an earlier run of this same SLURM job (requeued since)."""
    mine = _slurm_run()
    return bool(mine and holder) and (
        holder.get("slurm_job") == mine["slurm_job"]
        and int(holder.get("slurm_restart", mine["slurm_restart"])) < mine["slurm_restart"]
    )


def wait_out_earlier_run(run_dir: Path, holder: dict | None, holder_now) -> dict | None:
    """``holder`` when it is not an earlier run of this SLURM job; else wait up to
    :data:`EARLIER_RUN_WAIT_S` for its lock to end, asking ``holder_now()`` once a second (``None``: free),
    and return the holder left at the end (``None`` when the lock came free)."""
    if not earlier_run_of_this_job(holder):
        return holder
    print(
        f"acon: run dir {run_dir} is still locked by this job's previous run ({describe(holder)}, SLURM job "
        f"{holder['slurm_job']} before its requeue): a lost node's lock lasts until its lease ends; waiting up "
        f"to {EARLIER_RUN_WAIT_S:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.monotonic()
    while earlier_run_of_this_job(holder) and time.monotonic() - t0 < EARLIER_RUN_WAIT_S:
        time.sleep(min(1.0, EARLIER_RUN_WAIT_S))
        holder = holder_now()
    if holder is None:
        print(f"acon: the previous run's lock ended after {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return holder


def describe(holder: dict | None) -> str:
    """``host H, pid P, started T`` (or that the holder is not known yet)."""
    if not holder:
        return "holder not recorded yet"
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
    )


def _read(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


def alive_on_this_host(holder: dict | None) -> bool | None:
    """True/False for a holder on this host (its pid runs, and is the same process); None elsewhere."""
    if not holder or holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _proc_start(pid)
    return start is None or holder.get("pid_start") in (None, start)


def _lock_is_held(fd: int) -> bool | None:
    """Whether another process holds a lock on the file (F_GETLK: asks without taking it); None if the
    filesystem cannot say."""
    query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    except OSError:
        return None
    return struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK


class RunLock:
    """The exclusive lock of one run dir, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.previous: dict | None = None  # a dead run's entry that this lock took over
        self.holder: dict | None = None

    def busy(self, holder: dict | None) -> RunDirBusy:
        """The refusal: the dir, its holder, and what to do."""
        return RunDirBusy(
            f"run dir {self.run_dir} is in use by another run ({describe(holder)}; lock file {self.path}): "
            f"one run writes a run dir at a time; wait for it to end or stop it, or pick another "
            f"run_name/out_dir"
        )

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunDirBusy` at once (never waits for the holder)."""
        key = os.path.realpath(self.path)
        if key in _HELD:
            raise self.busy(_HELD[key].holder)
        with refused_writes(self.path):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock(fd)
            self.previous = _read(fd)
            self.holder = this_process()
            data = (json.dumps(self.holder, indent=1) + "\n").encode()
            with refused_writes(self.path, len(data)):
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd, _HELD[key] = fd, self
        return self

    def _lock(self, fd: int) -> None:
        try:
            holder = self._try_lock(fd)
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
        else:
            if holder is not None:
                holder = wait_out_earlier_run(self.run_dir, holder, lambda: self._try_lock(fd))
            if holder is None:
                return
            raise self.busy(holder)
        holder = _read(fd)  # no OS locks on this filesystem: only the file is left
        alive = alive_on_this_host(holder)
        if alive and holder.get("pid") != os.getpid():
            raise self.busy(holder)
        print(
            f"acon: warning: the filesystem of {self.run_dir} has no file locks: only runs on this host "
            f"are kept out of it"
            + (
                f"; the last entry ({describe(holder)}) cannot be checked" if alive is None and holder else ""
            ),
            file=sys.stderr,
            flush=True,
        )

    def _try_lock(self, fd: int) -> dict | None:
        """Take the lock without waiting: ``None`` when taken, else its holder (other errors raise)."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return self._holder_of_locked(fd)

    @staticmethod
    def _holder_of_locked(fd: int) -> dict | None:
        for _ in range(20):  # the holder writes its entry right after taking the lock
            holder = _read(fd)
            if holder:
                return holder
            time.sleep(0.05)
        return None

    def release(self) -> None:
        """Empty the file (no holder) and drop the lock; safe to call twice."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD.pop(os.path.realpath(self.path), None)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the entry stays; its free lock marks it as a dead run's
        finally:
            os.close(fd)  # closing drops the lock


def running_holder(run_dir: str | os.PathLike) -> dict | None:
    """The holder of a run dir that a live run is writing, else None; never takes the lock."""
    path = Path(run_dir) / LOCK_NAME
    own = _HELD.get(os.path.realpath(path))
    if own is not None:
        return own.holder
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder, held = _read(fd), _lock_is_held(fd)
    finally:
        os.close(fd)
    if held is not None:
        return (holder or {}) if held else None
    alive = alive_on_this_host(holder)
    return holder if holder and alive is not False else None


def refuse_if_busy(run_dir: str | os.PathLike) -> None:
    """Raise :class:`RunDirBusy` when a live run holds ``run_dir``; never takes or changes the lock."""
    holder = wait_out_earlier_run(Path(run_dir), running_holder(run_dir), lambda: running_holder(run_dir))
    if holder is not None:
        raise RunLock(run_dir).busy(holder)


def _launched_as_rank0() -> bool:
    """Whether this process is rank 0 (or alone) as its launcher's ``RANK`` says, before DDP is set up."""
    return os.environ.get("RANK", "0") in ("", "0")


def check_before_hydra(cfg: DictConfig) -> None:
    """train.py's checks of one composed job before Hydra starts (:func:`acon.validate.check_train_command`),
    and the run dir's lock: Hydra writes ``.hydra/`` and opens the job log (``train.log``) in the run dir
    before :meth:`acon.rundir.RunDir.open` takes the lock, so a job (rank 0, or without DDP) whose run dir a
    live run holds is refused here, read-only, with the lock's own :class:`RunDirBusy`: the live run's dir
    stays exactly as it was. A sweep (``-m``) is checked job by job before its first job starts. Only a dir
    that depends on what Hydra sets at run time (e.g. ``${hydra.job.num}``) is left to the lock itself (the
    window between this check and the lock is the interpreter's start). Call inside Hydra's
    ``initialize_config_dir`` (as :func:`acon.cli.check_command` does)."""
    from acon.validate import check_train_command

    check_train_command(cfg)
    if not _launched_as_rank0():
        return
    run_dir = job_run_dir(cfg, sys.argv[1:])
    if run_dir is not None:
        refuse_if_busy(run_dir)


def job_run_dir(cfg: DictConfig, args: list[str]) -> Path | None:
    """The dir Hydra gives the job ``cfg`` of the command line ``args``: ``hydra.run.dir``, or
    ``hydra.sweep.dir``/``hydra.sweep.subdir`` under ``-m``, with the command line's ``hydra.*`` settings;
    ``None`` where it depends on what only Hydra's run sets (``${hydra:...}``, ``${hydra.job.num}``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    multirun = any(a in ("-m", "--multirun") for a in args)
    settings = tuple(a for a in args if a.lstrip("+~").startswith("hydra."))
    if not multirun and not settings:
        return Path(cfg.out_dir) / cfg.run_name  # train.yaml's hydra.run.dir, without composing it again
    keys = ("sweep.dir", "sweep.subdir") if multirun else ("run.dir",)
    try:
        tree = OmegaConf.to_container(cfg, resolve=False)
        tree["_hydra_dirs"] = [_hydra_templates(settings)[k] for k in keys]
        return Path(*(str(p) for p in OmegaConf.create(tree)["_hydra_dirs"]))
    except OmegaConfBaseException:
        return None


@functools.cache
def _hydra_templates(settings: tuple[str, ...]) -> dict[str, str]:
    """train.yaml's ``hydra.run.dir``, ``hydra.sweep.dir`` and ``hydra.sweep.subdir`` after the ``hydra.*``
    command-line settings, interpolations unresolved (composed once per command line)."""
    from hydra import compose
    from omegaconf import OmegaConf

    hydra_cfg = compose(config_name="train", overrides=list(settings), return_hydra_config=True).hydra
    dirs = OmegaConf.to_container(OmegaConf.masked_copy(hydra_cfg, ["run", "sweep"]), resolve=False)
    return {
        "run.dir": dirs["run"]["dir"],
        "sweep.dir": dirs["sweep"]["dir"],
        "sweep.subdir": dirs["sweep"]["subdir"],
    }


def hydra_argv(argv: list[str]) -> list[str]:
    """The command line for Hydra: DDP ranks other than 0 leave ``.hydra/`` to rank 0
    (``hydra.output_subdir=null``; they log no lines to the job log), so a job that rank 0 refuses for a
    busy run dir changes nothing there."""
    if _launched_as_rank0():
        return argv
    if any(a.lstrip("+~").startswith("hydra.output_subdir") for a in argv[1:]):
        return argv
    return [*argv, "hydra.output_subdir=null"]
