"""SIGTERM/SIGUSR1 (what SLURM and torchrun send before a stop) become a checkpoint at the next step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" — torchrun --max-restarts and our SLURM wrapper rerun


class PreemptionFlag:
    """Installs handlers that only set a flag; the training loop checks it at step boundaries."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {}

    def install(self) -> PreemptionFlag:
        """Take over the signals (main thread only)."""
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __bool__(self) -> bool:
        return self.received is not None


def requeue_and_exit(reason: str, is_main: bool) -> None:
    """After the checkpoint is saved: ask SLURM to requeue this job (rank 0) and exit with 75."""
    job = os.environ.get("SLURM_JOB_ID")
    if is_main and job and os.environ.get("ACON_SLURM_REQUEUE", "1") == "1":
        try:
            subprocess.run(["scontrol", "requeue", job], check=False, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"acon: could not requeue SLURM job {job}: {e}", file=sys.stderr)
    print(
        f"acon: {reason}: checkpoint saved, exiting with status {REQUEUE_EXIT_CODE} (requeue)",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(REQUEUE_EXIT_CODE)
