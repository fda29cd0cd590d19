"""Config checks that run before any data is read or any model is built."""

from __future__ import annotations

import os
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
    if not isinstance(cfg.trainer.val_every_epochs, int) or cfg.trainer.val_every_epochs < 1:
        raise ConfigError(
            f"trainer.val_every_epochs={cfg.trainer.val_every_epochs!r} must be a whole number of epochs >= 1"
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
    if cfg.data.kind == "folder" and not str(cfg.data.get("pipeline", "reference")).startswith("shards"):
        root = Path(str(cfg.data.root)).expanduser()
        for split in (cfg.data.train_split, cfg.data.val_split):
            if not (root / split).is_dir():
                raise ConfigError(f"data.root={cfg.data.root!r} has no {split}/ folder ({root / split})")
    check_resume(cfg)


def check_cli_groups(args: list[str], config_dir: str | os.PathLike) -> None:
    """``group=option`` arguments naming an option that has no ``configs/<group>/<option>.yaml``."""
    config_dir = Path(config_dir)
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or "." in key or key.startswith(("hydra", "-")) or "(" in value:
            continue
        folder = config_dir / key
        if not folder.is_dir():
            continue
        valid = sorted(f.stem for f in folder.glob("*.yaml"))
        for option in value.split(","):
            if option not in ("", "null") and option not in valid:
                raise ConfigError(f"{key}={option!r} is not one of: {', '.join(valid)}")


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run will resume from (resume=auto: run_dir/last.pt), if it exists."""
    r = cfg.resume
    path = run_dir / "last.pt" if r in ("auto", None) else None if r == "none" else Path(r)
    return path if path is not None and path.is_file() else None


def check_resume(cfg: DictConfig) -> None:
    """Refuse, before any data is scanned, a resume checkpoint made by another model, activation or recipe.

    A checkpoint of another architecture is refused with its missing and unexpected keys.
    """
    import torch

    from acon import checkpoint as ckpt
    from acon.builders import build_model, run_identity
    from acon.trainer import run_dir_of

    path = resume_path(cfg, run_dir_of(cfg))
    if path is None:
        return
    state = ckpt.load_checkpoint(path, mmap=True)
    mine, theirs = run_identity(cfg), state.get("identity")
    if theirs == mine:
        return
    diff = [k for k in mine if not isinstance(theirs, dict) or mine[k] != theirs.get(k)]
    if ("model" in diff or "num_classes" in diff) and isinstance(state.get("model"), dict):
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.activation, int(cfg.data.num_classes))
        ckpt.load_model_state(model, state["model"], f"resume checkpoint {path}")
    raise ckpt.CheckpointError(
        f"refusing to resume from {path}: its {', '.join(diff)} differ from this run's config; "
        f"use a different run dir (out_dir/run_name) or resume=none"
    )
