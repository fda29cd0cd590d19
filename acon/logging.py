"""Rank-0 run logging: TensorBoard scalars and histograms, metrics.jsonl and a progress bar (the lines a
person reads are in ``acon.console``)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from acon.activations import MetaAconC
from acon.console import rate_text
from acon.params import activation_parameters
from acon.storage import is_write_refusal, refused_writes, write_failed


class RunLogger:
    """Writes TensorBoard events and metrics.jsonl into the run dir; a no-op on ranks other than 0.

    A write the filesystem refuses (full, quota, read-only, permission) raises
    :class:`acon.storage.WriteFailed`. For TensorBoard, ``tensorboard_errors="warn"`` instead logs one
    warning and the run continues with metrics.jsonl alone.
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        start_step: int = 0,
        history: list | None = None,
        tensorboard_errors: str = "raise",
    ) -> None:
        self.enabled, self.run_dir = enabled, Path(run_dir)
        self._writer, self._purge_step = None, start_step or None
        self.tensorboard_errors, self.tensorboard_failed = tensorboard_errors, False
        if enabled:
            self.rewrite_metrics(history or [])

    @property
    def writer(self):
        """The TensorBoard writer, opened on first use: a segment that logs nothing adds no event file."""
        if self._writer is None and self.enabled and not self.tensorboard_failed:
            from torch.utils.tensorboard import SummaryWriter

            with self.tensorboard_writes():
                _quiet_tensorboard_thread_errors()
                self._writer = SummaryWriter(self.run_dir / "tb", purge_step=self._purge_step)
        return self._writer

    @contextlib.contextmanager
    def tensorboard_writes(self):
        """A refused TensorBoard write (raised here, or by its writer thread at the next call): WriteFailed,
        or under ``tensorboard_errors=warn`` one warning and no more TensorBoard for this run."""
        try:
            yield
        except OSError as e:
            if self.tensorboard_errors != "warn" and not is_write_refusal(e):
                raise
            failure = write_failed(e.filename or self.run_dir / "tb", e)
            if self.tensorboard_errors != "warn":
                raise failure from None
            self._give_up_tensorboard(failure)

    def _give_up_tensorboard(self, failure: Exception) -> None:
        self.tensorboard_failed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass
        logging.getLogger("acon").warning(
            f"acon: warning: TensorBoard stopped ({failure}); trainer.tensorboard_errors=warn: training "
            f"continues and metrics.jsonl keeps every epoch"
        )

    def scalars(self, step: int, values: dict) -> None:
        """Log several scalars at ``step`` under their keys (e.g. ``train/loss``)."""
        with self.tensorboard_writes():
            if self.writer:
                for k, v in values.items():
                    self.writer.add_scalar(k, v, step)

    def activation_histograms(self, model: nn.Module, step: int) -> None:
        """Histograms of every activation layer's p1, p2 and β (p for ACON-B)."""
        if not self.writer:
            return
        for name, p in activation_parameters(model):
            self.histogram(f"act/{name}", p, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """A histogram of the finite values (TensorBoard cannot bin NaN/Inf); none if there are none."""
        values = values.detach().float().flatten().cpu()
        finite = values[torch.isfinite(values)]
        with self.tensorboard_writes():
            if self.writer and finite.numel():
                self.writer.add_histogram(tag, finite, step)

    def meta_beta_stats(self, model: nn.Module, images: torch.Tensor, step: int) -> None:
        """For Meta-ACON, the mean and std of the generated β of each layer on one batch."""
        if not self.writer:
            return
        metas = [(n, m) for n, m in model.named_modules() if isinstance(m, MetaAconC)]
        if not metas:
            return
        stats, hooks = {}, []
        for name, mod in metas:

            def hook(m, inp, _out, name=name):
                stats[name] = m.generate_beta(inp[0]).detach().float()

            hooks.append(mod.register_forward_hook(hook))
        was = model.training
        model.eval()
        with torch.no_grad():
            model(images)
        model.train(was)
        for h in hooks:
            h.remove()
        for name, beta in stats.items():
            self.histogram(f"meta_beta/{name}", beta, step)
            self.scalars(step, {f"meta_beta_mean/{name}": beta.mean().item()})
            self.scalars(step, {f"meta_beta_std/{name}": beta.std().item()})

    def epoch_line(self, record: dict) -> None:
        """Append one epoch's record to metrics.jsonl."""
        if self.enabled:
            path, line = self.run_dir / "metrics.jsonl", json.dumps(record) + "\n"
            with refused_writes(path, len(line.encode())), open(path, "a") as f:
                f.write(line)

    def rewrite_metrics(self, history: list) -> None:
        """Make metrics.jsonl exactly the checkpoint's history (after a resume)."""
        path, text = self.run_dir / "metrics.jsonl", "".join(json.dumps(rec) + "\n" for rec in history)
        with refused_writes(path, len(text.encode())), open(path, "w") as f:
            f.write(text)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (if it was opened)."""
        if self._writer:
            with self.tensorboard_writes():
                writer, self._writer = self._writer, None
                writer.close()


def _quiet_tensorboard_thread_errors() -> None:
    """TensorBoard's writer thread dies on a refused write and hands the error to the next call (which
    reports it); keep threading from also printing the thread's traceback."""
    previous = threading.excepthook
    if getattr(previous, "_acon_tensorboard", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook._acon_tensorboard = True
    threading.excepthook = hook


class Progress:
    """Images/s of this process, and a tqdm bar over the whole run with ETA when enabled and a person
    watches a terminal (rank 0; not under SLURM or into a log file: the epoch lines say the same)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool) -> None:
        from acon.console import show_progress_bar

        self.bar = None
        self.t0, self.images, self.rate = time.perf_counter(), 0, 0.0
        if show_progress_bar(enabled):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )

    def update(self, images: int, **postfix) -> float:
        """Advance one step; returns images/s since the start of this process."""
        self.images += images
        rate = self.rate = self.images / max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix({"img/s": rate_text(rate), **postfix}, refresh=False)
            self.bar.update(1)
        return rate

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
