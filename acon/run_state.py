"""The state a run carries between processes (its position, saved in every checkpoint) and how a process
is seeded and made deterministic."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig

from acon import cpu_budget


@dataclass
class Progression:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list = field(default_factory=list)
    best: dict | None = None
    bad_images_skipped: int = 0
    bad_image_files: dict = field(default_factory=dict)  # split -> distinct skipped files (capped)
    nonfinite_steps_skipped: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    origin: dict | None = None  # the checkpoint this run extends or fine-tunes (resume_mode), if any
    wall_segments_s: list = field(default_factory=list)  # wall time of each process that ran this run


def configure_determinism(cfg: DictConfig) -> None:
    """CPU threads and loader workers (``auto`` resolved to numbers in ``cfg``, see ``acon.cpu_budget``)
    and deterministic algorithms, as the config asks."""
    cpu_budget.configure(cfg)
    if cfg.deterministic:
        # cuBLAS refuses deterministic mode without a fixed workspace; it is read when cuBLAS starts, so
        # before the first matmul (a value the user set wins)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # set either way: the jobs of a sweep run one after another in one process, and a job must not
    # inherit the mode of the job before it
    torch.use_deterministic_algorithms(bool(cfg.deterministic), warn_only=False)
    if cfg.deterministic:
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def seed_process(seed: int) -> None:
    """Seed python, numpy and torch for this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
