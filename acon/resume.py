"""Loading the checkpoint a run continues from into the trainer's objects, the way the run dir chose
(continue, extend or finetune; :class:`acon.rundir.RunDir` decides which file and whether it may)."""

from __future__ import annotations

from pathlib import Path

from acon import checkpoint as ckpt
from acon import console
from acon.distributed import all_gather_object
from acon.run_state import Progression, seed_process
from acon.rundir import check_extended_length


def _ranks_text(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"


def check_same_resume(path: Path | None, step: int | None) -> None:
    """Raise ``CheckpointError`` unless every rank resumes from the same file at the same step (or every
    rank starts fresh).

    Each rank finds and reads the run dir's ``last.pt`` itself. On a shared file system whose clients
    cache names and attributes (NFS's ``actimeo``), a node can still see the file that an atomic save
    replaced, or none, shortly after another node wrote it; ranks would then continue from different steps
    and stop at different steps, with a collective left waiting. One small gather per resume checks it."""
    views = all_gather_object((str(path) if path is not None else None, step))
    if len({s for _, s in views}) == 1:  # the steps decide: a path may be spelled per node (its mount)
        return
    groups: dict[tuple, list[int]] = {}
    for rank, view in enumerate(views):
        groups.setdefault(view, []).append(rank)
    seen = "; ".join(
        f"{_ranks_text(ranks)}: {'a fresh start' if p is None else f'{p} at step {s}'}"
        for (p, s), ranks in groups.items()
    )
    raise ckpt.CheckpointError(
        f"the ranks see different resume checkpoints ({seen}): the run dir's file system showed the nodes "
        "different versions of it (a shared file system's attribute cache); rerun the same command"
    )


class ResumeState:
    """The :class:`acon.trainer.Trainer` method that restores model, optimiser, schedule, scaler, EMA,
    position and RNG from the chosen checkpoint."""

    def maybe_resume(self) -> Path | None:
        """Load the checkpoint the run dir chose (resume=auto: run_dir/last.pt, or resume=PATH), if any,
        the way it says (:meth:`RunDir.resume_kind`: continue, extend or finetune).

        Its model, activation and recipe were already checked against this run when the run dir opened.
        """
        path = self.rundir.resume_from
        state = None if path is None else ckpt.load_checkpoint(path, map_location=self.info.device)
        check_same_resume(path, None if state is None else state["progress"]["step"])
        if path is None:
            return None
        ckpt.load_model_state(self.model, state["model"], str(path))
        c, how = self.ctx, self.rundir.resume_kind(state)
        origin = {"resume_mode": how, "checkpoint": str(path), "step": state["progress"]["step"]}
        if how == "finetune":  # its weights only: fresh optimiser, schedule, EMA, position and RNG
            if c.ema is not None:
                c.ema.set(self.model)
            self.state.origin = origin
            self.announce(f"fine-tuning the weights of {path} (its step {origin['step']}) from step 0")
            seed_process(int(self.cfg.seed) * 1000 + self.info.rank)
            return path
        c.optimizer.load_state_dict(state["optimizer"])
        if how == "continue":  # extend keeps the schedule built for the new length
            c.scheduler.load_state_dict(state["scheduler"])
        c.scaler.load_state_dict(state["scaler"])
        if c.ema is not None and state.get("ema") is not None:
            c.ema.load_state_dict(state["ema"])
        self.state = Progression(**state["progress"])
        if how == "extend":
            check_extended_length(self.total_steps, self.state.step, path)
            self.state.origin = origin
        self.announce(
            f"{'extending' if how == 'extend' else 'resuming from'} {path} at step {self.state.step} "
            f"(epoch {console.epoch_text(self.epochs_done())}) of {self.total_steps}"
        )
        rngs = state["rng"]
        if self.info.rank < len(rngs) and state.get("world_size") == self.info.world_size:
            ckpt.restore_rng(rngs[self.info.rank])
        else:
            seed_process(int(self.cfg.seed) * 1000 + self.info.rank + 7919 * self.state.step)
        return path
