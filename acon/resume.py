"""Loading the checkpoint a run continues from into the trainer's objects, the way the run dir chose
(continue, extend or finetune; :class:`acon.rundir.RunDir` decides which file and whether it may)."""

from __future__ import annotations

from pathlib import Path

from acon import checkpoint as ckpt
from acon import console
from acon.run_state import Progression, seed_process
from acon.rundir import check_extended_length


class ResumeState:
    """The :class:`acon.trainer.Trainer` method that restores model, optimiser, schedule, scaler, EMA,
    position and RNG from the chosen checkpoint."""

    def maybe_resume(self) -> Path | None:
        """Load the checkpoint the run dir chose (resume=auto: run_dir/last.pt, or resume=PATH), if any,
        the way it says (:meth:`RunDir.resume_kind`: continue, extend or finetune).

        Its model, activation and recipe were already checked against this run when the run dir opened.
        """
        path = self.rundir.resume_from
        if path is None:
            return None
        state = ckpt.load_checkpoint(path, map_location=self.info.device)
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
