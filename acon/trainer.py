"""The training run: config → data, model, optimiser → resumable loop → checkpoints and results."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel as DDP

from acon import console, distributed
from acon.data.bad_images import BadImageError, SkipLog
from acon.data.watchdog import BatchWait, WaitedLoader
from acon.engine import HostFlags, StepContext, StepGuard, optimizer_step
from acon.errors import ConfigError
from acon.fuse_bn import fuse_for_run
from acon.logging import Progress, RunLogger
from acon.optim import build_ema, build_optimizer, build_scheduler, total_steps
from acon.preempt import PreemptionFlag, requeue_and_exit
from acon.release import end_workers, without_frames
from acon.resume import ResumeState
from acon.run_end import RunEnd
from acon.run_save import RunSave
from acon.run_state import Progression, configure_determinism, seed_process
from acon.rundir import REFUSALS, RunDir
from acon.stopping import EarlyStop, StopChecks
from acon.storage import HeldRefusals
from acon.syncbn import convert_sync_batchnorm
from acon.tasks import task_of
from acon.tasks.base import best_entry, is_better
from acon.validate import check_train_config


class Trainer(ResumeState, RunSave, StopChecks, RunEnd):
    """Holds one run's objects; :meth:`fit` runs it to completion, preemption or ``max_steps``."""

    def __init__(self, cfg: DictConfig, info: distributed.DistInfo, run: RunDir | None = None) -> None:
        self.rundir = run or RunDir.unlocked(cfg, info.is_main)  # which checkpoint to continue from, how
        self.cfg, self.info, self.run_dir = cfg, info, self.rundir.path
        self.task = task_of(cfg)
        tcfg, recipe = cfg.trainer, cfg.recipe
        self.train_loader, self.val_loader, n_train = self.task.build_loaders(cfg, info)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = self.task.build_model(cfg)
        if tcfg.sync_bn and info.enabled:
            model = convert_sync_batchnorm(model, info.device)
        self.fusion_note = fuse_for_run(
            model, tcfg.get("fuse_bn_act", "auto"), info.device, bool(tcfg.compile)
        )
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
        resolution = getattr(self.task, "resolution", None)  # recipe.resolution: a function of the epoch
        if resolution is not None:
            resolution.set_epoch(epoch)
        if hasattr(loader.sampler, "set_position"):
            loader.sampler.set_position(epoch, batches_done)
        else:  # streaming shards: each worker starts at its first unconsumed batch
            loader.dataset.set_position(epoch, batches_done)
        return iter(self.train_loader)

    def record_skips(self, split: str, files) -> None:
        """Add the bad files every rank skipped (a collective) to the run's list; raise past the budget."""
        here = list(getattr(files, "files", files) or ())
        self.skips.add(split, [f for rank_files in distributed.all_gather_object(here) for f in rank_files])

    def announce(self, what: str) -> None:
        """One line on rank 0, through the run's log (console and train.log)."""
        if self.info.is_main:
            console.log.info(f"acon: {what}")

    # ---------------------------------------------------------------- loop
    def at_max_steps(self) -> bool:
        """Whether ``trainer.max_steps`` stops the run here, before the end of its schedule."""
        max_steps = self.cfg.trainer.max_steps
        return bool(max_steps) and self.total_steps > self.state.step >= int(max_steps)

    def at_last_step(self) -> bool:
        """Whether the run trains no further step: the end of its schedule, or ``trainer.max_steps``."""
        return self.state.step >= self.total_steps or self.at_max_steps()

    def validate(self) -> dict:
        """Evaluate on the validation set (every image once across ranks); EMA weights too if kept. Its
        batches come through the training loop's wait: a stop signal or ``trainer.data_timeout_s`` ends it
        (:meth:`evaluate_or_stop`); a stop already pending at the run's last validation (its end, or
        ``trainer.max_steps``) lets that one finish, so the run completes."""
        c, task = self.ctx, self.task
        self.sync_bn_buffers()
        val = WaitedLoader(self.val_loader, self.waiter, finish_pending=self.at_last_step())
        metrics = self.evaluate_or_stop(self.model, val, self.flag)
        if c.ema is not None:
            ema = self.evaluate_or_stop(c.ema.module, val, self.flag)
            metrics.update({f"ema_{k}": ema[k] for k in task.scalar_metrics})
        return metrics

    def validation_due(self) -> bool:
        """At the end of training; every ``trainer.val_every_steps`` steps when set (iteration recipes),
        else at every ``trainer.val_every_epochs``-th epoch end."""
        s, t = self.state, self.cfg.trainer
        if s.step >= self.total_steps:
            return True
        if t.get("val_every_steps"):
            return s.step % int(t.val_every_steps) == 0
        return s.batch_in_epoch == 0 and s.epoch % int(t.val_every_epochs) == 0

    def record_due(self) -> bool:
        """Whether the run records a metrics line here: epoch ends, validation points, the end."""
        s, every = self.state, self.cfg.trainer.get("val_every_steps")
        return s.step > 0 and (
            s.batch_in_epoch == 0 or s.step >= self.total_steps or bool(every and s.step % int(every) == 0)
        )

    def position_record(self) -> dict:
        """The start of a metrics.jsonl record: epochs done, step, mean train loss since the last record, lr."""
        s = self.state
        return {
            "epoch": self.epochs_done(),
            "step": s.step,
            "train_loss": s.epoch_loss_sum / max(s.epoch_loss_count, 1),
            "lr": self.ctx.optimizer.param_groups[0]["lr"],
        }

    def epochs_done(self) -> int | float:
        """The run's position in epochs (fractional mid-epoch): every line and record uses it."""
        s = self.state
        return console.epochs_done(s.epoch, s.batch_in_epoch, self.batches_per_epoch)

    def settle(self) -> None:
        """Read the device-side step accounting (one synchronisation): the loss sums, the skipped steps,
        and the first non-finite step, which ends the run under ``nan_policy=stop`` before anything is
        saved or validated (last.pt stays the last good checkpoint)."""
        s = self.state
        first_bad, bad, loss_sum, count = self.guard.read()
        s.epoch_loss_sum, s.epoch_loss_count = s.epoch_loss_sum + loss_sum, s.epoch_loss_count + count
        if first_bad is not None and self.cfg.trainer.nan_policy == "stop":
            bpe = self.batches_per_epoch
            where = console.epoch_text(console.epochs_done(first_bad // bpe, first_bad % bpe, bpe))
            message = (
                f"non-finite training loss at step {first_bad} (epoch {where}); the last good checkpoint"
                f" is {self.run_dir / 'last.pt'} (trainer.nan_policy=stop)"
            )
            if self.info.is_main:
                console.to_log_files(f"error: {message}")
            raise FloatingPointError(message)
        s.nonfinite_steps_skipped += bad

    def end_of_epoch(self, logger: RunLogger, elapsed: float) -> None:
        """Record the run at an epoch end or a ``val_every_steps`` point (epochs fractional mid-epoch):
        validate when due, and save last.pt (best.pt too on a new best of the task's primary metric:
        top-1 error, mIoU, AP). Before a validation last.pt is saved first, so a preemption during a long
        validation loses no steps (the rerun validates there again)."""
        s, task = self.state, self.task
        self.settle()
        validate = self.validation_due()
        if validate:
            self.save()
        record = {**self.position_record(), "epoch_time_s": elapsed}
        s.epoch_loss_sum, s.epoch_loss_count = 0.0, 0
        is_best = False
        if validate:
            val = self.validate()
            s.bad_images_skipped += val.pop("bad_images_skipped")  # summed over ranks by evaluate
            self.record_skips("val", val.pop("bad_image_files"))
            record.update({f"val_{k}": v for k, v in val.items()})
            logger.scalars(s.step, {f"val/{k}": val[k] for k in task.scalar_metrics})
            pm = task.primary_metric
            is_best = is_better(task, val[pm], None if s.best is None else s.best[pm])
            if is_best:
                s.best = best_entry(task, val, record["epoch"], s.step)
        s.history.append(record)
        logger.epoch_line(record)
        if self.info.is_main:
            epochs = -(-self.total_steps // self.batches_per_epoch)
            console.log.info(console.epoch_line(record, epochs, s.best, self.clock, self.bar.rate, task))
        self.save(best=is_best)

    def train_step(self, images, targets, empty: bool = False) -> torch.Tensor | None:
        """One optimisation step and the position; returns the loss (on the device, never read here).

        A non-finite loss is flagged on the device (:class:`acon.engine.StepGuard`) and read at the next
        logging interval, save or validation; under ``nan_policy=skip`` the step's update is undone on the
        device, under ``stop`` the run ends there naming the step. ``empty``: some rank's batch had no
        readable image (``data.bad_image_policy=skip``), agreed by every rank in :meth:`agree`; then no rank
        runs the model (none waits in its collectives for another) and only the position moves."""
        s, c = self.state, self.ctx
        loss = None
        if not empty:

            def step() -> torch.Tensor:
                nonlocal loss
                loss = self.task.loss(c, images, targets)
                bad = self.guard.observe(loss, s.step)
                optimizer_step(c, loss, s.step)
                return bad

            if self.cfg.trainer.nan_policy == "skip":
                self.guard.masked(c, step)
            else:
                step()
        s.step += 1
        s.batch_in_epoch += 1
        return loss

    def log_step(
        self, logger: RunLogger, loss: torch.Tensor | None, rate: float, images, closing: bool
    ) -> None:
        """Every ``log_every`` steps: the device-side accounting is read (a non-finite step is caught
        here at the latest) and TensorBoard scalars written; activation histograms and Meta-ACON β
        statistics every ``hist_every`` steps and at the end of every epoch and of the run (``closing``)."""
        s, t = self.state, self.cfg.trainer
        if s.step % int(t.log_every) == 0:
            self.settle()
            lr = self.ctx.optimizer.param_groups[0]["lr"]
            scalars = {"train/lr": lr, "train/images_per_s": rate}
            if loss is not None:  # None: a step every rank skipped (an all-bad batch)
                scalars["train/loss"] = loss.item()
            logger.scalars(s.step, scalars)
        if s.step % int(t.hist_every) == 0 or closing:
            logger.activation_histograms(self.model, s.step)
            sample = self.task.sample_input(images) if images is not None else None
            if sample is not None:
                logger.meta_beta_stats(self.model, sample.to(self.info.device), s.step)

    def fit(self) -> dict | None:
        """Train to the end; returns the results dict on rank 0 (None when stopped early)."""
        cfg, t, s = self.cfg, self.cfg.trainer, self.state
        logger = self.logger = HeldRefusals(  # under DDP every rank ends on rank 0's refused write
            lambda: RunLogger(self.run_dir, self.info.is_main, s.step, s.history, t.tensorboard_errors),
            hold=self.info.enabled,
        )
        bar = self.bar = Progress(self.total_steps, s.step, self.info.is_main and bool(t.progress))
        self.clock = console.RunClock(s.step, self.total_steps)
        self.guard, self.flags = StepGuard(self.info.device), HostFlags(float(t.dist_timeout_s))
        if self.info.enabled and t.data_timeout_s and t.data_timeout_s >= t.dist_timeout_s:
            raise ConfigError(  # the other ranks wait in the step's flag all-reduce meanwhile
                f"trainer.data_timeout_s={t.data_timeout_s:g} must be below "
                f"trainer.dist_timeout_s={t.dist_timeout_s:g} under DDP"
            )
        if self.info.is_main:
            self.log_banner()
        if self.fusion_note:
            self.announce(self.fusion_note)
        flag = self.flag = PreemptionFlag().install()
        waiter = self.waiter = BatchWait(flag, t.get("data_timeout_s")).install()
        epochs, early = -(-self.total_steps // self.batches_per_epoch), None
        try:
            t_record = time.perf_counter()
            if self.record_due() and (not s.history or s.history[-1]["step"] != s.step):
                self.end_of_epoch(logger, 0.0)  # saved before a validation that did not finish
            if self.at_max_steps():  # the same max_steps command again: no step past it, validate there
                self.stop_at_max_steps(logger)
                return None
            while s.step < self.total_steps:
                batches = self.epoch_batches(s.epoch, s.batch_in_epoch)
                while True:
                    try:
                        batch = waiter.next(batches)
                    except StopIteration:
                        break
                    stop, stalled, empty = self.agree(batch, waiter, flag)
                    if stop or stalled:
                        raise self.stop_early(flag, waiter, batches, stalled)
                    images, targets, _ = batch
                    loss = self.train_step(images, targets, empty)
                    position = f"{self.epochs_done():.2f}/{epochs}"
                    rate = bar.update(int(cfg.recipe.batch_size), epoch=position)
                    epoch_done = s.batch_in_epoch == self.batches_per_epoch
                    self.log_step(logger, loss, rate, images, closing=epoch_done or self.at_last_step())
                    if epoch_done or s.step >= self.total_steps:
                        break
                    if self.record_due():  # a val_every_steps point
                        self.end_of_epoch(logger, time.perf_counter() - t_record)
                        t_record = time.perf_counter()
                    elif s.step % int(t.ckpt_every_steps) == 0:
                        self.settle()
                        self.save()
                    if self.at_max_steps():
                        break
                if s.batch_in_epoch == self.batches_per_epoch or s.step >= self.total_steps:
                    if s.batch_in_epoch == self.batches_per_epoch:
                        s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                    self.end_of_epoch(logger, time.perf_counter() - t_record)
                    t_record = time.perf_counter()
                if self.at_max_steps():
                    self.settle()
                    self.save()
                    self.stop_at_max_steps(logger)
                    return None
        except (FloatingPointError, BadImageError) as e:
            if self.info.is_main and not isinstance(e, FloatingPointError):  # settle logged its own
                from acon.cli import one_line

                console.to_log_files(f"error: {one_line(str(e))}")
            raise
        except EarlyStop as stop:  # saved; the abandoned batch wait may hold stuck workers: exit now
            early = stop
        finally:
            waiter.restore()
            flag.restore()
            bar.close()
            logger.close()
        if early is not None:  # release the lock first: the rerun takes the dir without a "took over" line
            self.rundir.close()
            requeue_and_exit(early.reason, self.info.is_main, early.received, now=True)
        return self.finish(sum(s.wall_segments_s))  # as of the final save: a no-op rerun adds nothing


def train(cfg: DictConfig) -> dict | None:
    """Check the config, set up DDP from the environment, open the run dir (resume choice, lock) and run
    training; the lock is released however the run ends."""

    check_train_config(cfg, distributed.world_size_from_env())
    configure_determinism(cfg)
    info = distributed.setup(cfg.trainer.device, float(cfg.trainer.dist_timeout_s))
    failure = trainer = None
    try:
        run = RunDir.open(cfg, info.is_main)
        try:
            trainer = Trainer(cfg, info, run)
            best = trainer.state.best
            run.prepare(trainer.resumed_from, trainer.state.origin is None, best and best["step"])
            run.warn_if_short_of_space(trainer.model)
            results = trainer.fit()
            end_workers(trainer.train_loader, trainer.val_loader)  # now, not whenever they are collected
            return results
        finally:
            run.close()
    except Exception as e:  # the loaders end before the error leaves, whoever keeps it (not on SystemExit: a
        if trainer is not None:  # stalled run exits at once, without waiting for its stuck workers)
            end_workers(trainer.train_loader, trainer.val_loader)
        if not isinstance(e, REFUSALS):
            raise  # with its traceback
        failure, trainer = e, None  # raised below without its frames
    finally:
        distributed.teardown()
    raise without_frames(failure)
