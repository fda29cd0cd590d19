"""How a run stops before its end: every rank agrees, once per step, on stop signals, stalled loaders and
empty batches; a stop saves last.pt first and leaves with the reason and the signal (exit 75 or 130)."""

from __future__ import annotations

from acon import distributed
from acon.data.watchdog import BatchWait, stall_report
from acon.preempt import PreemptionFlag


class EarlyStop(Exception):  # noqa: N818  (a stop, not an error)
    """The run stops before its end, after saving last.pt: ``reason`` and the signal that asked for it."""

    def __init__(self, reason: str, received: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.received = reason, received


class StopChecks:
    """The :class:`acon.trainer.Trainer` methods that decide, after each wait for a batch, whether the run
    goes on; they use the trainer's state, flags, loaders and :meth:`save`."""

    def agree(self, batch, waiter: BatchWait, flag: PreemptionFlag) -> tuple[bool, bool, bool]:
        """After the wait for a batch, before the step: every rank learns whether any rank was asked to
        stop or has a stalled loader or an empty batch (every image bad), and adds the batch's bad images to
        the job's budget. One host-side sum per step."""
        n_bad = batch[2] if batch is not None else 0
        stalled = batch is None and waiter.ended == "timeout"
        empty = batch is not None and batch[0] is None  # every image of this rank's batch was bad (skip)
        stop, stall, bad_total, any_empty = self.flags.sum(
            [float(bool(flag)), float(stalled), float(n_bad), float(empty)]
        )
        if bad_total:  # one budget and one list for the whole job, the same on every rank
            self.state.bad_images_skipped += int(bad_total)
            self.record_skips("train", n_bad)
        return stop > 0, stall > 0, any_empty > 0

    def stop_early(self, flag: PreemptionFlag, waiter: BatchWait, batches, stalled: bool) -> EarlyStop:
        """Save last.pt where the run is (no step is lost); the reason and exit status to leave with."""
        self.settle()
        self.save()
        if not stalled:
            return EarlyStop(f"received {flag.received or 'a stop signal on another rank'}", flag.received)
        here = None
        if waiter.ended == "timeout":
            here = f"rank {self.info.rank}: {stall_report(self.train_loader, batches)}"
        reports = [r for r in distributed.all_gather_object(here) if r]
        limit = self.cfg.trainer.data_timeout_s
        return EarlyStop(f"no batch within trainer.data_timeout_s={limit:g} s, stuck on {'; '.join(reports)}")
