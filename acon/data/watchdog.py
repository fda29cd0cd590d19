"""The wait for a training batch is a step boundary: a stop signal or a stalled input pipeline ends it.

:class:`BatchWait` fetches each batch from the main thread, as the loop always did (loader workers and
CUDA streams stay where they were), but the wait can be ended:

- a stop signal (SIGTERM/SIGUSR1/SIGINT) arriving while the loop waits raises :class:`WaitEnded` out of
  the loader at once (``PreemptionFlag.interrupt``), so the trainer saves and exits instead of waiting for
  a batch that may never come;
- a watchdog thread sends ``SIGUSR2`` to the main thread when one wait has lasted ``timeout_s``
  (``trainer.data_timeout_s``), which ends the wait the same way. :func:`stall_report` then names the
  loader worker that owes the batch: its pid, its state from ``/proc`` and the files it holds open. A
  ``SIGUSR2`` the watchdog did not send (SLURM, ``scancel --signal=USR2``) goes on to the stop-signal
  handler it took the signal over from.

Ending the wait abandons the loader's iterator; the run stops right after (the batch it waited for was
never used, so the saved position is exact).

Validation batches come through the same wait (:class:`WaitedLoader`): an ended wait ends the pass early,
as if the loader had run out, and the trainer then stops (see ``acon.stopping``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

TIMEOUT_SIGNAL = signal.SIGUSR2


class WaitEnded(BaseException):  # noqa: N818  (not an error: the wait was ended on purpose)
    """Raised inside a batch wait: ``reason`` is the stop signal's name or ``"timeout"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BatchWait:
    """Fetch batches with an interruptible wait; :meth:`next` returns None when the wait was ended."""

    def __init__(self, flag, timeout_s: float | None) -> None:
        self.flag, self.timeout_s = flag, (float(timeout_s) if timeout_s else None)
        self.ended: str | None = None  # "timeout" or a signal name, after a wait was ended
        self.waited_s = 0.0
        self._deadline: float | None = None
        self._fired = False
        self._sent = self._seen = 0  # SIGUSR2s the watchdog sent, and those the handler took as its own
        self._cond = threading.Condition()
        self._previous = None
        self._thread: threading.Thread | None = None
        self._main = threading.main_thread().ident

    def install(self) -> BatchWait:
        """Take over ``SIGUSR2`` and start the watchdog thread (main thread only; no-op without a timeout)."""
        if self.timeout_s and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(TIMEOUT_SIGNAL, self._on_timeout_signal)
            self._thread = threading.Thread(target=self._watch, name="acon-batch-watchdog", daemon=True)
            self._thread.start()
        return self

    def restore(self) -> None:
        """Stop the watchdog and put the previous ``SIGUSR2`` handler back."""
        if self._thread is not None:
            with self._cond:
                self._thread, self._deadline = None, None
                self._cond.notify_all()
            signal.signal(TIMEOUT_SIGNAL, self._previous)

    def next(self, iterator, pending_stops: bool = True):
        """The next batch; StopIteration at the end of the epoch; None when a stop signal or the timeout
        ended the wait (``self.ended`` says which). ``pending_stops=False``: a stop signal received before
        this call does not end it (the caller decides)."""
        if pending_stops and self.flag:
            self.ended = self.flag.received
            return None
        start = time.monotonic()
        try:
            try:
                self._arm(start)
                self.flag.interrupt = True
                return next(iterator)
            finally:
                self.flag.interrupt = False
                self._arm(None)
        except WaitEnded as e:
            self.ended, self.waited_s = e.reason, time.monotonic() - start
            return None

    def _arm(self, start: float | None) -> None:
        if self._thread is None:
            return
        with self._cond:
            self._fired = False
            self._deadline = None if start is None else start + self.timeout_s
            self._cond.notify_all()

    def _watch(self) -> None:
        with self._cond:
            while self._thread is not None:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._fired, self._deadline = True, None
                self._sent += 1
                signal.pthread_kill(self._main, TIMEOUT_SIGNAL)

    def _on_timeout_signal(self, signum, frame) -> None:
        if self._sent > self._seen:  # the watchdog's own signal
            self._seen = self._sent
            if self._fired and self.flag.interrupt:
                self._fired, self.flag.interrupt = False, False
                raise WaitEnded("timeout")
            return  # the batch came as the watchdog fired: nothing left to end
        if callable(self._previous):  # from outside: a stop signal (acon.preempt.STOP_SIGNALS)
            self._previous(signum, frame)


class WaitedLoader:
    """``loader`` iterated through ``wait`` (a :class:`BatchWait`): a stop signal or the timeout ends the
    pass early, as if the loader had run out. ``ended`` says why (None after a complete pass);
    ``iterator`` is the pass's iterator (for :func:`stall_report`). Other attributes are the loader's.
    ``finish_pending``: a stop signal received before the pass began does not end it (only a new one)."""

    def __init__(self, loader, wait: BatchWait, finish_pending: bool = False) -> None:
        self.loader, self.wait, self.finish_pending = loader, wait, finish_pending
        self.ended: str | None = None
        self.iterator = None

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.ended, self.iterator = None, iter(self.loader)
        flag = self.wait.flag
        seen = flag.count if self.finish_pending else 0
        while True:
            if flag.count > seen:
                self.ended = flag.received
                return
            try:
                batch = self.wait.next(self.iterator, pending_stops=False)
            except StopIteration:
                return
            if batch is None:
                self.ended = self.wait.ended
                return
            yield batch


# ------------------------------------------------------------------ what is stuck
def _proc_state(pid: int) -> str:
    """``T (stopped)``, ``D (disk sleep)``, ... from /proc/<pid>/status; ``gone`` if it exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return "gone"
    return "unknown"


def _open_files(pid: int) -> list[str]:
    """Regular files ``pid`` holds open (libraries, devices, pipes and shared memory left out)."""
    files = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return files
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("/") or target.startswith(("/dev/", "/proc/", "/sys/")):
            continue
        if target.endswith((".so", ".py", ".pyc")) or ".so." in target or "(deleted)" in target:
            continue
        files.append(target)
    return sorted(set(files))


def _owing_workers(loader, iterator) -> list[tuple[int | None, int]]:
    """(worker id, pid) of the worker that owes the awaited batch (all live workers when unknown)."""
    inner = getattr(loader, "loader", loader)
    it = iterator if hasattr(iterator, "_workers") else getattr(inner, "_iterator", None)
    workers = getattr(it, "_workers", None)
    if workers:
        # a worker that cannot run (stopped, in uninterruptible disk sleep, gone) is the stuck one, whatever
        # the loader's bookkeeping of which batch is due says (its prefetch may already be delivered)
        blocked = [
            (i, w.pid) for i, w in enumerate(workers) if _proc_state(w.pid)[:1] in ("T", "t", "D", "g")
        ]
        if blocked:
            return blocked
        info = getattr(it, "_task_info", {}).get(getattr(it, "_rcvd_idx", -1))
        if info:
            return [(info[0], workers[info[0]].pid)]
        return [(i, w.pid) for i, w in enumerate(workers)]
    return [(None, pid) for pid in _children(os.getpid())]


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return sorted(kids)


def stall_report(loader, iterator) -> str:
    """Which loader worker the wait is stuck on, e.g. ``worker 1 (pid 4242, T (stopped), reading …)``."""
    parts, inherited = [], set(_open_files(os.getpid()))  # logs and outputs the worker got at fork
    for wid, pid in _owing_workers(loader, iterator):
        files = [f for f in _open_files(pid) if f not in inherited]
        reading = f", reading {', '.join(files[:3])}" if files else ", no data file open"
        who = f"worker {wid} " if wid is not None else "process "
        parts.append(f"{who}(pid {pid}, {_proc_state(pid)}{reading})")
    if not parts:
        return "no loader worker process (the wait is in the main process)"
    return "DataLoader " + "; ".join(parts)
