"""In-process training runs that record every optimiser step's lr and state, and the python log records."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from conftest import compose, tiny_overrides
from torch.optim.optimizer import register_optimizer_step_pre_hook

from acon.trainer import train


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def small_shufflenet(root, out, *extra: str) -> list[str]:
    """A few CPU steps of ShuffleNetV2 0.5x (ReLU) at 16 px on the tiny JPEG folder; ``extra`` last."""
    return [
        *tiny_overrides(root, out),
        "model=shufflenetv2_x0_5_small",
        "activation=relu",
        "trainer.threads=1",
        "recipe.warmup_steps=0",
        "data.img_size=16",
        "data.val_transform.resize=18",
        *extra,
    ]


def weights_norm(params) -> float:
    """Sum of squares of all parameters: a fingerprint of the weights independent of their order."""
    return float(sum(p.detach().double().pow(2).sum() for p in params))


def run_recording(overrides: list[str]) -> SimpleNamespace:
    """Train in-process.

    Returns ``results``, ``lrs`` (the lr of every optimiser step), ``first`` (the optimiser state size and
    the weights' fingerprint just before the first update) and ``lines`` (log records as (level, message)).
    """
    rec = SimpleNamespace(lrs=[], first=None, lines=[])

    def before_step(opt, args, kwargs):
        rec.lrs.append(opt.param_groups[0]["lr"])
        if rec.first is None:
            params = [p for g in opt.param_groups for p in g["params"]]
            rec.first = SimpleNamespace(state_size=len(opt.state), norm=weights_norm(params))

    hook = register_optimizer_step_pre_hook(before_step)
    records, root = _Records(), logging.getLogger()
    root.addHandler(records)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        rec.results = train(compose(overrides))
    finally:
        hook.remove()
        root.removeHandler(records)
        root.setLevel(level)
    rec.lines = records.lines
    return rec
