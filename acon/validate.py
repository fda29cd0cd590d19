"""Config checks that run before any data is read or any model is built."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the valid choices."""


def _choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, valid))}")


def check_train_config(cfg: DictConfig, world_size: int) -> None:
    """Fail fast on names, combinations and paths that would break the run later."""
    import models
    from acon.data.build import DATA_KINDS
    from acon.engine import PRECISIONS
    from acon.optim import SCHEDULES

    _choice("model.arch", cfg.model.arch, models.list_models())
    _choice("data.kind", cfg.data.kind, DATA_KINDS)
    _choice("recipe.schedule", cfg.recipe.schedule, SCHEDULES)
    _choice("trainer.precision", cfg.trainer.precision, tuple(PRECISIONS))
    _choice("trainer.device", cfg.trainer.device, ("auto", "cpu", "cuda"))
    _choice("trainer.nan_policy", cfg.trainer.nan_policy, ("stop", "skip"))
    _choice("data.bad_image_policy", cfg.data.bad_image_policy, ("raise", "skip"))
    batch = int(cfg.recipe.batch_size)
    if batch % world_size:
        raise ConfigError(
            f"recipe.batch_size={batch} (global) does not divide by the world size {world_size}; "
            f"use a multiple of {world_size}"
        )
    if not cfg.recipe.iterations and not cfg.recipe.epochs:
        raise ConfigError("set recipe.iterations or recipe.epochs")
    if cfg.resume not in ("auto", "none", None) and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint file")
    if cfg.data.kind == "folder" and not cfg.data.root:
        raise ConfigError(
            f"data.root is not set for data={cfg.data.name}: pass data.root=/path/with/train_and_val"
        )
    if cfg.data.kind == "folder" and not Path(str(cfg.data.root)).expanduser().is_dir():
        raise ConfigError(f"data.root={cfg.data.root!r} does not exist")
