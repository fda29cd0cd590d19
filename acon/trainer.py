"""The training run: config → data, model, optimiser → resumable loop → checkpoints and results."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from acon import checkpoint as ckpt
from acon import console, distributed, fallbacks
from acon.builders import run_identity
from acon.data.bad_images import SkipLog
from acon.engine import StepContext, optimizer_step
from acon.logging import Progress, RunLogger
from acon.optim import build_ema, build_optimizer, build_scheduler, log_schedule, total_steps
from acon.preempt import PreemptionFlag, requeue_and_exit
from acon.report import git_commit, run_dir_of, write_json
from acon.run_state import Progression, configure_determinism, seed_process
from acon.rundir import carry_over_checkpoints, set_aside_previous_run
from acon.syncbn import convert_sync_batchnorm
from acon.tasks import task_of
from acon.tasks.base import best_entry, is_better, unprefixed
from acon.validate import check_extended_length, check_train_config, resume_kind, resume_path


class Trainer:
    """Holds one run's objects; :meth:`fit` runs it to completion, preemption or ``max_steps``."""

    def __init__(self, cfg: DictConfig, info: distributed.DistInfo) -> None:
        self.cfg, self.info, self.run_dir = cfg, info, run_dir_of(cfg)
        self.task = task_of(cfg)
        tcfg, recipe = cfg.trainer, cfg.recipe
        self.train_loader, self.val_loader, n_train = self.task.build_loaders(cfg, info)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = self.task.build_model(cfg)
        if tcfg.sync_bn and info.enabled:
            model = convert_sync_batchnorm(model, info.device)
        fmt = torch.channels_last if tcfg.channels_last else torch.preserve_format
        self.model = model.to(info.device, memory_format=fmt)
        net = (
            DDP(self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
            if info.enabled
            else self.model
        )
        net = torch.compile(net) if tcfg.compile else net
        self.batches_per_epoch = n_train // int(recipe.batch_size)
        self.total_steps = total_steps(recipe, self.batches_per_epoch)
        optimizer = build_optimizer(self.model, recipe)
        mixup = self.task.build_mixup(cfg)
        self.ctx = StepContext(
            model=net,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, recipe, self.total_steps),
            scaler=torch.amp.GradScaler(info.device.type, enabled=tcfg.precision == "fp16"),
            criterion=self.task.build_criterion(cfg, mixup),
            device=info.device,
            precision=tcfg.precision,
            channels_last=bool(tcfg.channels_last),
            clip_grad=recipe.clip_grad,
            mixup=mixup,
            ema=build_ema(self.model, recipe),
            raw_model=self.model,
        )
        self.state = Progression()
        self.resumed_from = self.maybe_resume()
        sizes = {"train": n_train, "val": console.dataset_size(self.val_loader)}
        self.skips = SkipLog(self.state.bad_image_files, sizes, cfg.data.get("max_bad_images"))
        if self.resumed_from is None:
            seed_process(int(cfg.seed) * 1000 + info.rank)
        self.segment, self.segment_start = len(self.state.wall_segments_s), time.perf_counter()

    def epoch_batches(self, epoch: int, batches_done: int):
        """The training batches of ``epoch`` after the first ``batches_done`` (resumable mid-epoch)."""
        loader = getattr(self.train_loader, "loader", self.train_loader)
        if hasattr(loader.sampler, "set_position"):
            loader.sampler.set_position(epoch, batches_done)
        else:  # streaming shards: each worker starts at its first unconsumed batch
            loader.dataset.set_position(epoch, batches_done)
        return iter(self.train_loader)

    # ---------------------------------------------------------------- checkpoints
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
        """Write last.pt atomically on rank 0 (all ranks contribute their RNG states); best.pt if asked."""
        self.sync_bn_buffers()
        self.record_wall_time()
        rng_all = distributed.all_gather_object(ckpt.capture_rng())
        if self.info.is_main:
            ckpt.assert_finite(self.model)
            last = ckpt.atomic_save(self.checkpoint_state(rng_all), self.run_dir / "last.pt")
            keep = int(self.cfg.trainer.keep_step_checkpoints)
            if keep > 0:
                ckpt.atomic_copy(last, self.run_dir / f"step_{self.state.step}.pt")
                ckpt.prune_step_checkpoints(self.run_dir, keep)
            if best:
                ckpt.atomic_copy(last, self.run_dir / "best.pt")
        distributed.barrier()

    def maybe_resume(self) -> Path | None:
        """Load the resume checkpoint (resume=auto: run_dir/last.pt, or resume=PATH), if there is one.

        Its model, activation and recipe were already checked against this run by ``check_train_config``.
        """
        path = resume_path(self.cfg, self.run_dir)
        if path is None:
            return None
        state = ckpt.load_checkpoint(path, map_location=self.info.device)
        ckpt.load_model_state(self.model, state["model"], str(path))
        c, how = self.ctx, resume_kind(self.cfg, state)
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
            f"(epoch {self.state.epoch}, batch {self.state.batch_in_epoch}) of {self.total_steps}"
        )
        rngs = state["rng"]
        if self.info.rank < len(rngs) and state.get("world_size") == self.info.world_size:
            ckpt.restore_rng(rngs[self.info.rank])
        else:
            seed_process(int(self.cfg.seed) * 1000 + self.info.rank + 7919 * self.state.step)
        return path

    def record_skips(self, split: str, files) -> None:
        """Add the bad files every rank skipped (a collective) to the run's list; raise past the budget."""
        here = list(getattr(files, "files", files) or ())
        self.skips.add(split, [f for rank_files in distributed.all_gather_object(here) for f in rank_files])

    def announce(self, what: str) -> None:
        """One line on rank 0, through the run's log (console and train.log)."""
        if self.info.is_main:
            console.log.info(f"acon: {what}")

    # ---------------------------------------------------------------- loop
    def validate(self) -> dict:
        """Evaluate on the validation set (every image once across ranks); EMA weights too if kept."""
        c, task = self.ctx, self.task
        self.sync_bn_buffers()
        metrics = task.evaluate(self.model, self.val_loader, self.cfg, self.info)
        if c.ema is not None:
            ema = task.evaluate(c.ema.module, self.val_loader, self.cfg, self.info)
            metrics.update({f"ema_{k}": ema[k] for k in task.scalar_metrics})
        return metrics

    def validation_due(self) -> bool:
        """Every ``trainer.val_every_epochs`` epochs, and always at the end of training."""
        return (
            self.state.step >= self.total_steps
            or self.state.epoch % int(self.cfg.trainer.val_every_epochs) == 0
        )

    def end_of_epoch(self, logger: RunLogger, train_loss: float, lr: float, elapsed: float) -> None:
        """Record the epoch, validate when due, and save last.pt (and best.pt on a new best of the task's
        primary metric: top-1 error, mIoU, AP)."""
        s, task = self.state, self.task
        record = {
            "epoch": s.epoch,
            "step": s.step,
            "train_loss": train_loss,
            "lr": lr,
            "epoch_time_s": elapsed,
        }
        is_best = False
        if self.validation_due():
            val = self.validate()
            s.bad_images_skipped += val.pop("bad_images_skipped")  # summed over ranks by evaluate
            self.record_skips("val", val.pop("bad_image_files"))
            record.update({f"val_{k}": v for k, v in val.items()})
            logger.scalars(s.step, {f"val/{k}": val[k] for k in task.scalar_metrics})
            pm = task.primary_metric
            is_best = is_better(task, val[pm], None if s.best is None else s.best[pm])
            if is_best:
                s.best = best_entry(task, val, s.epoch, s.step)
        s.history.append(record)
        logger.epoch_line(record)
        if self.info.is_main:
            epochs = -(-self.total_steps // self.batches_per_epoch)
            console.log.info(console.epoch_line(record, epochs, s.best, self.clock, self.bar.rate, task))
        self.save(best=is_best)

    def train_step(self, images, targets, n_bad, stop_requested: bool) -> tuple[torch.Tensor, bool]:
        """One optimisation step (skipped on a non-finite loss under nan_policy=skip), the bad-image budget
        of the whole job, and the position; returns the loss and whether any rank was asked to stop."""
        s, t, c = self.state, self.cfg.trainer, self.ctx
        empty = self.batch_skipped_by_any_rank(images)
        loss = torch.zeros((), device=self.info.device) if empty else self.task.loss(c, images, targets)
        nonfinite, stop_now, bad_total = distributed.all_reduce_sum(
            [float(not torch.isfinite(loss)), float(stop_requested), float(n_bad)], self.info.device
        )
        nonfinite, stop_now = nonfinite > 0, stop_now > 0  # every rank takes the same branch
        if bad_total:  # one budget and one list for the whole job, the same on every rank
            s.bad_images_skipped += int(bad_total)
            self.record_skips("train", n_bad)
        if nonfinite:
            if t.nan_policy == "stop":
                raise FloatingPointError(
                    f"non-finite training loss at step {s.step} (epoch {s.epoch}); the last "
                    f"good checkpoint is {self.run_dir / 'last.pt'} (trainer.nan_policy=stop)"
                )
            s.nonfinite_steps_skipped += 1
        elif not empty:  # an empty batch on any rank: no rank steps (its bad images are counted above)
            optimizer_step(c, loss, s.step)
            s.epoch_loss_sum += loss.item()
            s.epoch_loss_count += 1
        s.step += 1
        s.batch_in_epoch += 1
        return loss, stop_now

    def batch_skipped_by_any_rank(self, images) -> bool:
        """True when this rank's batch (``images is None``: every image bad, ``data.bad_image_policy=skip``)
        or another rank's is empty; agreed by every rank before any forward pass (no rank then waits in
        the model's collectives for one that has nothing to run). One collective, only under skip with
        several ranks."""
        empty = images is None
        if self.info.enabled and self.cfg.data.get("bad_image_policy") == "skip":
            empty = distributed.all_reduce_sum([float(empty)], self.info.device)[0] > 0
        return empty

    def log_step(self, logger: RunLogger, loss: torch.Tensor, rate: float, images, closing: bool) -> None:
        """TensorBoard scalars every ``log_every`` steps; activation histograms and Meta-ACON β statistics
        every ``hist_every`` steps and at the end of every epoch and of the run (``closing``)."""
        s, t = self.state, self.cfg.trainer
        if s.step % int(t.log_every) == 0:
            lr = self.ctx.optimizer.param_groups[0]["lr"]
            logger.scalars(s.step, {"train/loss": loss.item(), "train/lr": lr, "train/images_per_s": rate})
        if s.step % int(t.hist_every) == 0 or closing:
            logger.activation_histograms(self.model, s.step)
            sample = self.task.sample_input(images)
            if sample is not None:
                logger.meta_beta_stats(self.model, sample.to(self.info.device), s.step)

    def fit(self) -> dict | None:
        """Train to the end; returns the results dict on rank 0 (None when stopped early)."""
        cfg, t, s, c = self.cfg, self.cfg.trainer, self.state, self.ctx
        logger = RunLogger(self.run_dir, self.info.is_main, s.step, s.history)
        bar = self.bar = Progress(self.total_steps, s.step, self.info.is_main and bool(t.progress))
        self.clock = console.RunClock(s.step, self.total_steps)
        if self.info.is_main:
            self.log_banner()
        flag = PreemptionFlag().install()
        max_steps = int(t.max_steps) if t.max_steps else None
        try:
            while s.step < self.total_steps:
                t_epoch = time.perf_counter()
                for images, targets, n_bad in self.epoch_batches(s.epoch, s.batch_in_epoch):
                    loss, stop_now = self.train_step(images, targets, n_bad, bool(flag))
                    rate = bar.update(int(cfg.recipe.batch_size), epoch=s.epoch)
                    epoch_done = s.batch_in_epoch == self.batches_per_epoch
                    run_done = s.step >= self.total_steps or bool(max_steps and s.step >= max_steps)
                    self.log_step(logger, loss, rate, images, closing=epoch_done or run_done)
                    if stop_now and not epoch_done:
                        self.save()
                        bar.close()
                        requeue_and_exit(
                            f"received {flag.received or 'a stop signal on another rank'}",
                            self.info.is_main,
                            flag.received,
                        )
                    if epoch_done or s.step >= self.total_steps:
                        break
                    if s.step % int(t.ckpt_every_steps) == 0:
                        self.save()
                    if max_steps and s.step >= max_steps:
                        break
                if s.batch_in_epoch == self.batches_per_epoch or s.step >= self.total_steps:
                    train_loss = s.epoch_loss_sum / max(s.epoch_loss_count, 1)
                    s.epoch_loss_sum, s.epoch_loss_count = 0.0, 0
                    if s.batch_in_epoch == self.batches_per_epoch:
                        s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                    self.end_of_epoch(
                        logger, train_loss, c.optimizer.param_groups[0]["lr"], time.perf_counter() - t_epoch
                    )
                    if stop_now:
                        requeue_and_exit(
                            f"received {flag.received or 'a stop signal'}", self.info.is_main, flag.received
                        )
                if max_steps and s.step >= max_steps and s.step < self.total_steps:
                    self.save()
                    self.stop_at_max_steps(logger)
                    return None
        finally:
            flag.restore()
            bar.close()
            logger.close()
        return self.finish(sum(s.wall_segments_s))  # as of the final save: a no-op rerun adds nothing

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
                "epoch": round(s.epoch + s.batch_in_epoch / self.batches_per_epoch, 4),
                "step": s.step,
                "train_loss": s.epoch_loss_sum / max(s.epoch_loss_count, 1),
                "lr": self.ctx.optimizer.param_groups[0]["lr"],
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
        if not self.info.is_main:
            return None
        import models

        last = last or self.state.history[-1]
        results = {
            "status": status,
            **self.task.result_fields({**unprefixed(last), "epoch": last["epoch"]}, self.state.best),
            "params": models.count_params(self.model),
            "flops": models.count_flops(self.model, self.task.flops_input(self.cfg)),
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
            "data": self.cfg.data.name,
            "task": self.task.name,
            "primary_metric": self.task.primary_metric,
            "seed": int(self.cfg.seed),
            "git_commit": git_commit(),
            "identity": run_identity(self.cfg),
            "fallbacks": fallbacks.across_ranks(every_rank),
            "origin": self.state.origin,
        }
        write_json(self.run_dir / "results.json", results)
        console.log_summary(results, self.run_dir)
        return results


def train(cfg: DictConfig) -> dict | None:
    """Check the config, set up DDP from the environment, and run training."""

    check_train_config(cfg, distributed.world_size_from_env())
    configure_determinism(cfg)
    info = distributed.setup(cfg.trainer.device, float(cfg.trainer.dist_timeout_s))
    try:
        trainer = Trainer(cfg, info)
        if info.is_main:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temp_files(trainer.run_dir)
            if trainer.resumed_from is None:
                set_aside_previous_run(trainer.run_dir)
            elif trainer.state.origin is None:  # extend/finetune write their own checkpoints as they go
                best = trainer.state.best
                carry_over_checkpoints(trainer.resumed_from, trainer.run_dir, best and best["step"])
            OmegaConf.save(cfg, trainer.run_dir / "config.yaml", resolve=True)
        return trainer.fit()
    finally:
        distributed.teardown()
