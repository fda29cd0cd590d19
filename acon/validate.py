"""Config checks that run before any data is read or any model is built."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from acon.config_rules import NON_NEGATIVE, POSITIVE_INT, OneOf, Range
from acon.errors import ConfigError

__all__ = [
    "ConfigError",
    "check_cli_groups",
    "check_eval_config",
    "check_schema",
    "check_train_command",
    "check_train_config",
]

# Keys inside free-form nodes (the instantiated transforms and activation layer) that have a rule.
NESTED_RULES = {
    "activation.layer.impl": OneOf(("auto", "reference", "fused")),
    "data.train_transform.color_jitter": NON_NEGATIVE,
    "data.val_transform.resize": POSITIVE_INT,
}


def not_allowed(key: str, value, allowed: Range | OneOf) -> ConfigError:
    """``key=value is not allowed: must be <what is allowed>`` (or ``is not one of: ...`` for choices)."""
    if isinstance(allowed, OneOf):
        return ConfigError(f"{key}={value!r} is not {allowed.describe()}")
    return ConfigError(f"{key}={value!r} is not allowed: must be {allowed.describe()}")


def _imports(allowed: Range | OneOf | None) -> bool:
    """Whether checking a value against ``allowed`` imports a module (a choice read from a registry)."""
    return isinstance(allowed, OneOf) and allowed.source is not None


def _check_node(node: DictConfig, prefix: str, registries: bool) -> None:
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    for f in dataclasses.fields(schema):
        key, allowed = f"{prefix}{f.name}", f.metadata.get("allowed")
        if OmegaConf.is_missing(node, f.name):
            if allowed is not None:
                raise ConfigError(f"{key} is not set: pass {key}=<{allowed.describe()}>")
            continue
        value = node[f.name]
        if isinstance(value, DictConfig):
            _check_node(value, f"{key}.", registries)
            continue
        if _imports(allowed) != registries:
            continue
        if allowed is not None and value is not None and not allowed.accepts(value):
            raise not_allowed(key, value, allowed)


def check_schema(cfg: DictConfig) -> None:
    """Every range and choice declared in ``acon.config_schema`` (and ``NESTED_RULES``), in config order:
    first those that import nothing, then the choices read from registries (models, data kinds), which
    import torch, so a value out of range is reported within a second of the command."""
    _check_node(cfg, "", registries=False)
    for key, allowed in NESTED_RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not allowed.accepts(value):
            raise not_allowed(key, value, allowed)
    _check_node(cfg, "", registries=True)


def check_combinations(cfg: DictConfig, world_size: int) -> None:
    """Values that are fine alone but not together."""
    if cfg.data.kind == "synthetic" and cfg.data.pipeline != "reference":
        raise ConfigError(
            f"data.pipeline={cfg.data.pipeline!r} reads image files; data={cfg.data.name} (random tensors) "
            "works only with data.pipeline=reference"
        )
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
        raise ConfigError(
            "recipe.iterations and recipe.epochs are both null: set one of them to an integer > 0"
        )


def check_train_command(cfg: DictConfig) -> None:
    """train.py's checks of one composed command line, before Hydra starts the run."""
    check_schema(cfg)  # before torch loads (acon.distributed): a value out of range is reported in a second
    from acon.distributed import world_size_from_env

    check_combinations(cfg, world_size_from_env())
    check_resume_value(cfg)


def check_resume_value(cfg: DictConfig) -> None:
    """``resume`` is auto, none or an existing checkpoint file."""
    if cfg.resume not in ("auto", "none", None) and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume!r} is not auto, none or an existing checkpoint file")


def check_train_config(cfg: DictConfig, world_size: int) -> None:
    """Fail fast on types, ranges, names, combinations and paths that would break the run later.

    Only the config itself: the resume checkpoint is checked when the run dir is opened (acon.rundir).
    """
    from acon.builders import EXTERNAL_ARCHS

    check_schema(cfg)
    if cfg.model.arch in EXTERNAL_ARCHS:
        check_external_model(cfg.model)
    check_combinations(cfg, world_size)
    check_resume_value(cfg)
    from acon.tasks import task_of

    task_of(cfg).check_config(cfg)
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


def check_external_model(model_cfg: DictConfig) -> None:
    """``model=timm`` / ``model=torchvision``: the model name is set and known to that library."""
    key = "model.timm_name" if model_cfg.arch == "timm" else "model.tv_name"
    name = OmegaConf.select(model_cfg, key.split(".", 1)[1], throw_on_missing=False)
    if model_cfg.arch == "timm":
        import timm

        known = name in timm.list_models()
    else:
        import torchvision

        known = name in torchvision.models.list_models(torchvision.models)
    if not known:
        raise ConfigError(
            f"{key}={name!r} is not a {model_cfg.arch} classifier name (see {model_cfg.arch}'s list)"
        )


def check_eval_config(cfg: DictConfig) -> None:
    """eval.py: a checkpoint that exists, valid ranges and choices."""
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise ConfigError(
            "checkpoint is not set: pass checkpoint=PATH (a .pt file or a folder of *.pt files)"
        )
    target = Path(str(cfg.checkpoint)).expanduser()
    if not target.exists():
        raise ConfigError(
            f"checkpoint={cfg.checkpoint!r} does not exist: pass a .pt file or a folder of them"
        )
    check_schema(cfg)


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
        valid = sorted(f.relative_to(folder).with_suffix("").as_posix() for f in folder.rglob("*.yaml"))
        for option in value.split(","):
            if option not in ("", "null") and option not in valid:
                raise ConfigError(f"{key}={option!r} is not one of: {', '.join(valid)}")


RESUME_MODES = ("strict", "extend", "finetune")  # what each may change: acon.rundir.check_resume
