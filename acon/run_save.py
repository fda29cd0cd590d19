"""Saving a running trainer: the full state a run continues from, written atomically on rank 0."""

from __future__ import annotations

import time

from omegaconf import OmegaConf

from acon import checkpoint as ckpt
from acon import distributed
from acon.builders import run_identity
from acon.rundir import raise_on_every_rank
from acon.storage import WriteFailed


class RunSave:
    """The :class:`acon.trainer.Trainer` methods that build its checkpoint and write last.pt / best.pt."""

    def checkpoint_state(self, rng_all: list) -> dict:
        """The full state: everything needed to continue exactly where the run is."""
        c = self.ctx
        return {
            "format": ckpt.FORMAT,
            "model": self.model.state_dict(),
            "optimizer": c.optimizer.state_dict(),
            "scheduler": c.scheduler.state_dict(),
            "scaler": c.scaler.state_dict(),
            "ema": c.ema.state_dict() if c.ema is not None else None,
            "progress": vars(self.state).copy(),
            "rng": rng_all,
            "world_size": self.info.world_size,
            "identity": run_identity(self.cfg),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def record_wall_time(self) -> None:
        """Update this process's segment (its wall time so far) in the progress state."""
        self.state.wall_segments_s[self.segment :] = [time.perf_counter() - self.segment_start]

    def sync_bn_buffers(self) -> None:
        """Every rank takes rank 0's BatchNorm statistics (model and EMA) before validating or saving."""
        distributed.sync_bn_buffers(self.model, self.ctx.ema.module if self.ctx.ema is not None else None)

    def save(self, best: bool = False) -> None:
        """Write last.pt atomically on rank 0 (all ranks contribute their RNG states); best.pt if asked.

        A write the filesystem refuses ends every rank with rank 0's :class:`WriteFailed`; last.pt is
        then still the previous complete checkpoint.
        """
        self.sync_bn_buffers()
        self.record_wall_time()
        rng_all = distributed.all_gather_object(ckpt.capture_rng(self.info.device))
        failure = None
        if self.info.is_main:
            failure = self.held_write_failure()  # a refused metrics write: no checkpoint, every rank ends
        if self.info.is_main and failure is None:
            ckpt.assert_finite(self.model)
            try:
                self.rundir.write_checkpoints(self.checkpoint_state(rng_all), self.state.step, best)
            except WriteFailed as e:
                failure = e
        raise_on_every_rank(failure)  # also the barrier after the save
