"""Config checks that run before any data is read or any model is built."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from acon.config_schema import NON_NEGATIVE, POSITIVE_INT, OneOf, Range
from acon.errors import ConfigError

__all__ = [
    "ConfigError",
    "check_cli_groups",
    "check_eval_config",
    "check_resume",
    "check_schema",
    "check_train_command",
    "check_train_config",
    "resume_path",
]

# Keys inside free-form nodes (the instantiated transforms and activation layer) that have a rule.
NESTED_RULES = {
    "activation.layer.impl": OneOf(("auto", "reference", "fused")),
    "data.train_transform.color_jitter": NON_NEGATIVE,
    "data.val_transform.resize": POSITIVE_INT,
}


def _choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, valid))}")


def not_allowed(key: str, value, allowed: Range | OneOf) -> ConfigError:
    """``key=value is not allowed: must be <what is allowed>`` (or ``is not one of: ...`` for choices)."""
    if isinstance(allowed, OneOf):
        return ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, allowed.options()))}")
    return ConfigError(f"{key}={value!r} is not allowed: must be {allowed.describe()}")


def _check_node(node: DictConfig, prefix: str) -> None:
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if OmegaConf.is_missing(node, f.name):
            if f.metadata.get("allowed") is not None:
                raise ConfigError(f"{key} is not set: pass {key}=<{f.metadata['allowed'].describe()}>")
            continue
        value = node[f.name]
        if isinstance(value, DictConfig):
            _check_node(value, f"{key}.")
            continue
        allowed = f.metadata.get("allowed")
        if allowed is not None and value is not None and not allowed.accepts(value):
            raise not_allowed(key, value, allowed)


def check_schema(cfg: DictConfig) -> None:
    """Every range and choice declared in ``acon.config_schema`` (and ``NESTED_RULES``), in config order."""
    _check_node(cfg, "")
    for key, allowed in NESTED_RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not allowed.accepts(value):
            raise not_allowed(key, value, allowed)


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
    from acon.distributed import world_size_from_env

    check_schema(cfg)
    check_combinations(cfg, world_size_from_env())
    check_resume_value(cfg)


def check_resume_value(cfg: DictConfig) -> None:
    """``resume`` is auto, none or an existing checkpoint file."""
    if cfg.resume not in ("auto", "none", None) and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume!r} is not auto, none or an existing checkpoint file")


def check_train_config(cfg: DictConfig, world_size: int) -> None:
    """Fail fast on types, ranges, names, combinations and paths that would break the run later.

    Everything about the config itself comes before the resume checkpoint is looked at.
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
    check_resume(cfg)


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


RESUME_MODES = ("strict", "extend", "finetune")
NETWORK_KEYS = ("model", "activation", "num_classes", "task", "backbone")
LENGTH_KEYS = ("recipe.epochs", "recipe.iterations")


def identity_diff(mine: dict, theirs) -> list[str]:
    """The identity keys in which a checkpoint differs from this run (recipe keys as ``recipe.<key>``)."""
    if not isinstance(theirs, dict):
        return list(mine)
    diff = []
    for key in [*mine, *(k for k in theirs if k not in mine)]:
        a, b = mine.get(key), theirs.get(key)
        if key == "recipe" and isinstance(a, dict) and isinstance(b, dict):
            diff += [f"recipe.{k}" for k in [*a, *(k for k in b if k not in a)] if a.get(k) != b.get(k)]
        elif a != b:
            diff.append(key)
    return diff


def _identity_of(path: Path):
    from acon import checkpoint as ckpt

    return ckpt.load_checkpoint(path, mmap=True).get("identity")


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run will resume from (resume=auto: run_dir/last.pt), if it exists.

    An extended or fine-tuned run that already saved its own last.pt (same identity, resume_mode
    included) continues from that one, so a requeued job keeps its progress.
    """
    from acon.builders import run_identity

    r, own = cfg.resume, run_dir / "last.pt"
    if cfg.get("resume_mode", "strict") != "strict" and r != "none" and own.is_file():
        if not identity_diff(run_identity(cfg), _identity_of(own)):
            return own
    path = own if r in ("auto", None) else None if r == "none" else Path(r)
    return path if path is not None and path.is_file() else None


def resume_kind(cfg: DictConfig, state: dict) -> str:
    """continue (the checkpoint is this run's own), or the run's resume_mode: extend | finetune."""
    from acon.builders import run_identity

    if not identity_diff(run_identity(cfg), state.get("identity")):
        return "continue"
    return str(cfg.get("resume_mode", "strict"))


def _length(recipe) -> tuple[str, int]:
    return (
        ("iterations", int(recipe["iterations"]))
        if recipe.get("iterations")
        else ("epochs", int(recipe["epochs"]))
    )


def check_extended_length(total_steps: int, checkpoint_step: int, path: Path) -> None:
    """resume_mode=extend must leave steps to train."""
    if total_steps <= checkpoint_step:
        raise ConfigError(
            f"resume_mode=extend needs a longer schedule: this run has {total_steps} steps and {path} is "
            f"already at step {checkpoint_step}; raise recipe.epochs or recipe.iterations"
        )


def _check_mode(cfg: DictConfig, path: Path, diff: list[str], theirs: dict) -> None:
    """What resume_mode=extend|finetune may change: extend the schedule length, finetune the recipe."""
    mode = cfg.resume_mode
    network = [k for k in diff if k in NETWORK_KEYS]
    if network:
        raise ConfigError(
            f"resume_mode={mode} continues the same network, but {path} has another {', '.join(network)}"
        )
    other = [k for k in diff if k != "resume_mode" and k not in LENGTH_KEYS]
    if mode == "extend" and other:
        raise ConfigError(
            f"resume_mode=extend changes only the schedule length (recipe.epochs / recipe.iterations), but "
            f"{', '.join(other)} differ from {path}; use resume_mode=finetune for a new recipe"
        )
    if mode == "extend":
        (unit, new), (old_unit, old) = _length(cfg.recipe), _length(theirs["recipe"])
        if unit == old_unit and new <= old:
            raise ConfigError(
                f"resume_mode=extend needs a longer schedule: recipe.{unit}={new} is not more than the "
                f"{old} of {path}"
            )


def check_resume(cfg: DictConfig) -> None:
    """Refuse, before any data is scanned, a resume checkpoint made by another model, activation or recipe.

    A checkpoint of another architecture is refused with its missing and unexpected keys. With
    ``resume_mode=extend`` the schedule may be longer; with ``resume_mode=finetune`` the recipe may differ.
    """
    import torch

    from acon import checkpoint as ckpt
    from acon.builders import run_identity
    from acon.report import run_dir_of
    from acon.tasks import task_of

    mode = cfg.get("resume_mode", "strict")
    _choice("resume_mode", mode, RESUME_MODES)
    run_dir = run_dir_of(cfg)
    path = resume_path(cfg, run_dir)
    if path is None:
        if mode != "strict":
            where = "resume=none" if cfg.resume == "none" else f"no checkpoint at resume={cfg.resume}"
            if cfg.resume in ("auto", None):
                where = f"resume=auto found no last.pt in {run_dir}"
            raise ConfigError(f"resume_mode={mode} needs a checkpoint to start from, but {where}")
        return
    state = ckpt.load_checkpoint(path, mmap=True)
    theirs = state.get("identity")
    diff = identity_diff(run_identity(cfg), theirs)
    if not diff:
        return
    if ("model" in diff or "num_classes" in diff) and isinstance(state.get("model"), dict):
        with torch.device("meta"):
            model = task_of(cfg).build_model(cfg)
        ckpt.load_model_state(model, state["model"], f"resume checkpoint {path}")
    if mode == "strict":
        raise ckpt.CheckpointError(
            f"refusing to resume from {path}: its {', '.join(diff)} differ from this run's config; "
            f"use a different run dir (out_dir/run_name) or resume=none, or on purpose resume_mode=extend "
            f"(a longer schedule) or resume_mode=finetune (its weights, a fresh optimiser and schedule)"
        )
    _check_mode(cfg, path, diff, theirs)
