"""How a run stops before its end: every rank agrees, once per step, on stop signals, stalled loaders and
empty batches; a stop saves last.pt first and leaves with the reason and the signal (exit 75 or 130).

A validation pass waits for its batches the same way (``trainer.data_timeout_s``, stop signals). A pass
ended early leaves at once without saving: last.pt was saved at this very step just before the
validation began (``Trainer.end_of_epoch``, and the ``max_steps`` stop), so nothing is lost, and the
rerun validates there again (an epoch end or a ``val_every_steps`` point; after a ``max_steps`` stop the
rerun without it resumes and finishes the schedule). A second save would only rewrite the same step
(minutes for a large model, while the job is being stopped). A stop signal already pending when a
validation begins ends it before its first batch, except the run's last validation (its end or the
``max_steps`` stop), which then finishes so the run completes; a signal arriving during it ends it.
"""

from __future__ import annotations

from acon import distributed
from acon.data.watchdog import BatchWait, WaitedLoader, stall_report
from acon.preempt import PreemptionFlag
from acon.rundir import raise_on_every_rank
from acon.storage import WriteFailed


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
        the job's budget; a run-dir write refused on rank 0 ends every rank here (exit 4). One host-side
        sum per step."""
        n_bad = batch[2] if batch is not None else 0
        stalled = batch is None and waiter.ended == "timeout"
        empty = batch is not None and batch[0] is None  # every image of this rank's batch was bad (skip)
        refused = self.held_write_failure()
        stop, stall, bad_total, any_empty, any_refused = self.flags.sum(
            [float(bool(flag)), float(stalled), float(n_bad), float(empty), float(refused is not None)]
        )
        if any_refused:  # rank 0's metrics/TensorBoard write was refused: every rank ends with exit 4
            raise_on_every_rank(refused)
        if bad_total:  # one budget and one list for the whole job, the same on every rank
            self.state.bad_images_skipped += int(bad_total)
            self.record_skips("train", n_bad)
        return stop > 0, stall > 0, any_empty > 0

    def held_write_failure(self) -> WriteFailed | None:
        """Rank 0's refused run-dir write held under DDP (:class:`acon.storage.HeldRefusals`), if any."""
        return getattr(getattr(self, "logger", None), "failure", None)

    def stop_early(self, flag: PreemptionFlag, waiter: BatchWait, batches, stalled: bool) -> EarlyStop:
        """Save last.pt where the run is (no step is lost); the reason and exit status to leave with."""
        self.settle()
        self.save()
        if not stalled:
            return EarlyStop(f"received {flag.received or 'a stop signal on another rank'}", flag.received)
        return EarlyStop(self.stall_reason(waiter.ended == "timeout", self.train_loader, batches, ""))

    def stall_reason(self, here_stalled: bool, loader, iterator, what: str) -> str:
        """Why a stalled input pipeline stops the run, naming the stuck loader worker of every stalled
        rank (a collective)."""
        here = f"rank {self.info.rank}: {stall_report(loader, iterator)}" if here_stalled else None
        reports = [r for r in distributed.all_gather_object(here) if r]
        limit = self.cfg.trainer.data_timeout_s
        return f"no {what}batch within trainer.data_timeout_s={limit:g} s, stuck on {'; '.join(reports)}"

    def evaluate_or_stop(self, model, loader: WaitedLoader, flag: PreemptionFlag) -> dict:
        """``task.evaluate`` over ``loader``; raises :class:`EarlyStop` on every rank when a stop signal or a
        stalled loader ended some rank's pass (its metrics are incomplete: they are dropped; nothing is
        saved, see the module doc). Every rank's pass ends, early or not, before the task's own
        collectives, which therefore still match; one host-side sum per pass then agrees on the stop."""
        metrics = None
        try:
            metrics = self.task.evaluate(model, loader, self.cfg, self.info)
        except RuntimeError:  # a pass ended before its first batch "saw no samples": stop below
            if loader.ended is None:
                raise
        stalled = loader.ended == "timeout"
        stop, stall = self.flags.sum([float(loader.ended is not None and not stalled), float(stalled)])
        if not (stop or stall):
            return metrics
        where = f"at step {self.state.step}; last.pt holds that step"
        if stall:
            reason = self.stall_reason(stalled, loader.loader, loader.iterator, "validation ")
            raise EarlyStop(f"{reason} ({where})")
        received = flag.received or "a stop signal on another rank"
        raise EarlyStop(f"received {received} during the validation {where}", flag.received)
