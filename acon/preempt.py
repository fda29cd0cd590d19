"""Stop signals become a checkpoint at the next step boundary; DataLoader workers leave them to the trainer.

SIGTERM/SIGUSR1 (what SLURM, ``scancel``, ``timeout`` and torchrun send before a stop) end in a checkpoint,
``scontrol requeue`` under SLURM (unless the job was cancelled: :func:`slurm_job_cancelled`) and exit 75;
SIGINT (Ctrl-C) in a checkpoint and exit 130. A stalled input
pipeline (``trainer.data_timeout_s``) also ends in a checkpoint and exit 75: a requeue may well find the
file system healthy again. A signal that arrives while the loop waits for a batch ends the wait at once
(``PreemptionFlag.interrupt``, ``acon.data.watchdog``). The signal
usually reaches the whole process group, so the DataLoader workers ignore these signals
(:func:`worker_ignores_stop_signals`) and are shut down by their loader, or by torch's watchdog when
the main process is gone.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401  (its exit handler is registered first)
import os
import signal
import subprocess
import sys

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" — torchrun --max-restarts and our SLURM wrapper rerun
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT", "SIGUSR2")
"""SIGUSR2 too: submitit's own time-limit signal (and ``scancel --signal=USR2``); left to submitit's handler
it requeued and exited mid-step on rank 0, without a checkpoint, while the other ranks waited in a
collective. The batch-wait watchdog's own SIGUSR2 is told apart (``acon.data.watchdog``)."""


def _kill_daemonic_children() -> None:
    """At interpreter exit, SIGKILL daemonic children (DataLoader workers) that are still alive.

    Our workers ignore SIGTERM, so multiprocessing's own exit handler, which terminates daemonic
    children with SIGTERM and then joins them, would wait forever for a worker whose loader was never
    shut down. Registered after multiprocessing's handler, this one runs first (atexit is LIFO).
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_daemonic_children)


def _signals(names: tuple[str, ...]) -> list[signal.Signals]:
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


def worker_ignores_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: ignore the signals the main process turns into a checkpoint.

    A group-wide SIGTERM/SIGINT must not kill the workers before the main process has saved. Workers
    still end when their loader shuts them down, and when the main process dies: torch's watchdog ends
    a worker that is waiting for work, and on Linux the kernel sends SIGKILL to one that is stuck
    (``PR_SET_PDEATHSIG``; loaders are iterated from the main thread, which lives as long as the process).
    """
    for sig in _signals(STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()
    sys.excepthook = _quiet_when_the_consumer_hangs_up(sys.excepthook)


def _quiet_when_the_consumer_hangs_up(hook):
    """A worker's ``sys.excepthook`` that drops connection errors and passes everything else on.

    A worker hands the main process each batch's shared-memory file descriptors over a connection served
    by multiprocessing's fd-sharing thread, which reports errors through ``sys.excepthook``. A stop signal
    ends the main process's wait for a batch at once, possibly mid-handshake; the worker then saw a reset
    connection and printed a ``ConnectionResetError`` traceback beside the one stop line. The main
    process no longer wants that batch, so nothing is lost by not printing it.
    """

    def excepthook(kind, value, traceback):
        if issubclass(kind, (ConnectionError, EOFError)):
            return
        hook(kind, value, traceback)

    return excepthook


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (best effort; nothing elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class PreemptionFlag:
    """Installs handlers that only set a flag; the training loop checks it at step boundaries.

    A second SIGINT while the first is pending raises ``KeyboardInterrupt`` (stop now, without saving).
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.received: str | None = None
        self.count = 0  # stop signals received so far (a wait can tell a new one from a pending one)
        self.interrupt = False  # set while the loop waits for a batch: a stop signal ends that wait
        self._previous = {}

    def install(self) -> PreemptionFlag:
        """Take over the signals (main thread only)."""
        for sig in _signals(self.SIGNALS):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = self.received or name
        self.count += 1
        if self.interrupt:
            from acon.data.watchdog import WaitEnded

            self.interrupt = False
            raise WaitEnded(self.received)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __bool__(self) -> bool:
        return self.received is not None


def under_slurm_requeue() -> bool:
    """True when this job is a SLURM job that asks to be requeued on a stop (``ACON_SLURM_REQUEUE``)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("ACON_SLURM_REQUEUE", "1") == "1"


SHOW_JOB_TIMEOUT_S = 10.0
"""How long rank 0 waits for ``scontrol show job`` before it treats the stop as not a cancel (and requeues):
SLURM kills a stopping job KillWait (30 s by default) after its SIGTERM, and the requeue still has to run."""


def slurm_job_cancelled(job: str) -> bool:
    """Whether SLURM is ending job ``job`` because someone cancelled it (``scancel``), read from
    ``scontrol show job``: COMPLETING or CANCELLED, with no reason and no preemption time.

    ``scontrol requeue`` also requeues a cancelled job (Slurm 22.05 and later), so without this check a
    ``scancel`` came back two minutes later. A time limit (``Reason=TimeLimit``), a preemption
    (``PreemptTime`` set), a running job (``--signal``, ``scancel --signal``) or a state that cannot be read
    is not a cancel: those jobs are requeued."""
    try:
        done = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=SHOW_JOB_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return False
    fields = dict(word.partition("=")[::2] for word in done.stdout.split())
    ending = fields.get("JobState") in ("COMPLETING", "CANCELLED")
    return (
        done.returncode == 0
        and ending
        and fields.get("Reason") == "None"
        and fields.get("PreemptTime") == "None"
    )


def _requeue(job: str) -> bool:
    """``scontrol requeue job``; False, with one line giving scontrol's error, when it fails."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"acon: could not requeue SLURM job {job}: {e}", file=sys.stderr)
        return False
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        print(f"acon: could not requeue SLURM job {job}: scontrol requeue: {why}", file=sys.stderr)
    return done.returncode == 0


def stop_line(message: str) -> None:
    """One line on stderr and in the run's log files (train.log), where every stop reason is kept."""
    from acon.console import to_log_files

    print(message, file=sys.stderr, flush=True)
    to_log_files(message)


def _exit(status: int, now: bool) -> None:
    """``sys.exit``; with ``now``, leave at once without interpreter teardown, which would join loader
    workers that may be stuck (5 s each and again after SIGTERM); they die with this process
    (``PR_SET_PDEATHSIG``, see :func:`worker_ignores_stop_signals`)."""
    if now:
        logging.shutdown()  # flush the run's train.log
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def requeue_and_exit(reason: str, is_main: bool, received: str | None = None, now: bool = False) -> None:
    """After the checkpoint is saved: exit 130 for SIGINT; otherwise ask SLURM to requeue (rank 0), exit 75.

    Outside SLURM the line says to rerun the same command (torchrun --max-restarts reruns it too).
    ``now``: exit without interpreter teardown (see :func:`_exit`).
    """
    if received == "SIGINT":
        if is_main:
            stop_line(
                f"acon: {reason}: checkpoint saved, exiting with status {INTERRUPT_EXIT_CODE} "
                "(rerun the same command to resume)"
            )
        _exit(INTERRUPT_EXIT_CODE, now)
    job = os.environ.get("SLURM_JOB_ID")
    ask = is_main and under_slurm_requeue()
    cancelled = ask and slurm_job_cancelled(job)
    requeued = ask and not cancelled and _requeue(job)
    what = f"requeued SLURM job {job}" if requeued else "rerun the same command to resume"
    if cancelled:
        what = f"SLURM job {job} was cancelled, so it is not requeued; {what}"
    if is_main:
        stop_line(f"acon: {reason}: checkpoint saved, exiting with status {REQUEUE_EXIT_CODE} ({what})")
    _exit(REQUEUE_EXIT_CODE, now)
