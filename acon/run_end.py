"""The ends of a run, as the trainer writes them: the start banner, a validated stop at ``trainer.max_steps``,
and results.json with the closing summary."""

from __future__ import annotations

from acon import console, distributed, fallbacks
from acon.builders import run_identity
from acon.logging import RunLogger
from acon.optim import log_schedule
from acon.report import git_commit, write_json
from acon.rundir import raise_on_every_rank
from acon.storage import WriteFailed
from acon.tasks.base import unprefixed


class RunEnd:
    """The :class:`acon.trainer.Trainer` methods that open and close a run's record: banner, max_steps
    stop, results.json."""

    def log_banner(self) -> None:
        """The start banner (rank 0): model, activation, size, data, devices, batch, steps, run dir."""
        facts = console.run_facts(
            self.cfg,
            self.model,
            self.info,
            self.train_loader,
            self.val_loader,
            self.total_steps,
            self.run_dir,
            self.task.flops_input(self.cfg),
        )
        if self.resumed_from is not None:
            facts.resumed_step, facts.resumed_from = self.state.step, self.resumed_from
        console.log_banner(facts)
        log_schedule(self.cfg.recipe, self.total_steps, self.batches_per_epoch)  # its line, its warnings

    def stop_at_max_steps(self, logger: RunLogger) -> None:
        """Validate once where ``trainer.max_steps`` stopped the run: a metrics.jsonl line, results.json.

        Runs after the checkpoint is saved and is not part of its history (a resume drops the line).
        """
        s, task = self.state, self.task
        last = s.history[-1] if s.history else {}
        record = last if last.get("step") == s.step and f"val_{task.primary_metric}" in last else None
        if record is None:  # not already validated at the end of an epoch at this step
            val = self.validate()
            s.bad_images_skipped += val.pop("bad_images_skipped")  # summed over ranks by evaluate
            self.record_skips("val", val.pop("bad_image_files"))
            record = {
                **self.position_record(),
                "stopped_at_max_steps": True,
                **{f"val_{k}": v for k, v in val.items()},
            }
            logger.epoch_line(record)
            logger.scalars(s.step, {f"val/{k}": val[k] for k in task.scalar_metrics})
        self.finish(sum(s.wall_segments_s), status="stopped at max_steps", last=record)
        self.announce(
            f"stopped at trainer.max_steps={self.cfg.trainer.max_steps} (step {s.step} of {self.total_steps}),"
            f" validated once: {task.metrics_text(unprefixed(record))}; results in {self.run_dir}"
        )

    def finish(self, wall: float, status: str = "complete", last: dict | None = None) -> dict | None:
        """Write results.json on rank 0: the task's final and best metrics, params, FLOPs, time and
        throughput over every segment of the run, commit, and every rank's fallbacks."""
        every_rank = distributed.all_gather_object(fallbacks.recorded())  # a collective: all ranks call it
        results, failure = None, None
        if self.info.is_main:
            try:
                results = self.write_results(wall, status, last, every_rank)
            except WriteFailed as e:
                failure = e
        raise_on_every_rank(failure or self.held_write_failure())  # every rank ends with a refused write
        return results

    def write_results(self, wall: float, status: str, last: dict | None, every_rank: list) -> dict:
        """Rank 0's results.json (see :meth:`finish`)."""
        import models
        from acon.data.subsets import data_label

        last = last or self.state.history[-1]
        best_pt = self.run_dir / "best.pt"
        flops_size = self.task.flops_input(self.cfg)  # the size the reported metric is measured at
        results = {
            "status": status,
            **self.task.result_fields({**unprefixed(last), "epoch": last["epoch"]}, self.state.best),
            "params": models.count_params(self.model),
            "flops": models.count_flops(self.model, flops_size),
            "flops_img_size": flops_size if isinstance(flops_size, int) else list(flops_size),
            "wall_time_s": wall,  # every segment of a preempted/resumed run
            "images_per_s": self.state.step * int(self.cfg.recipe.batch_size) / max(wall, 1e-9),
            "world_size": self.info.world_size,
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "bad_images_skipped": self.state.bad_images_skipped,
            "bad_image_files": self.state.bad_image_files,
            "nonfinite_steps_skipped": self.state.nonfinite_steps_skipped,
            "model": self.cfg.model.name,
            "activation": self.cfg.activation.name,
            "recipe": self.cfg.recipe.name,
            "data": data_label(self.cfg.data),  # name[subset] under data.class_subset
            "task": self.task.name,
            "primary_metric": self.task.primary_metric,
            "seed": int(self.cfg.seed),
            "git_commit": git_commit(),
            "identity": run_identity(self.cfg),
            "fallbacks": fallbacks.across_ranks(every_rank),
            "best_checkpoint": str(best_pt) if self.state.best is not None and best_pt.is_file() else None,
            "origin": self.state.origin,
        }
        write_json(self.run_dir / "results.json", results)
        console.log_summary(results, self.run_dir)
        return results
