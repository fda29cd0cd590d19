"""Command-line keys that the configs do not have, and arguments that are not ``key=value``.

``python train.py actvation=relu`` and ``+actvation=relu`` both end in ``error: unknown key 'actvation'
in actvation=relu: did you mean activation?`` before Hydra starts: a key added with ``+`` is accepted only
inside a free-form node (``model.kwargs``, the transforms), where it goes to a constructor.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from acon.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ENTRY_POINTS = {"train": "train.py", "eval": "eval.py"}


def _split(arg: str) -> tuple[str, str, str, str]:
    """(prefix of +/++/~, key, '=' or '', value) of one override."""
    body = arg.lstrip("+~")
    key, sep, value = body.partition("=")
    return arg[: len(arg) - len(body)], key, sep, value


def is_group(key: str) -> bool:
    """``key`` names a config group (``model``, ``hydra/launcher``) or a package override (``a@b``)."""
    return "@" in key or key.startswith("hydra") or (CONFIGS / key).is_dir()


def check_arguments(argv: list[str], config_name: str) -> None:
    """Every argument is a flag or ``key=value``; a lone path to eval.py gets the ``checkpoint=`` form."""
    script = ENTRY_POINTS.get(config_name, f"{config_name}.py")
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # Hydra's flags (--cfg job, -cn NAME, ...) take values of their own: Hydra parses them
    for arg in argv:
        if arg.startswith("-") or "=" in arg:
            continue
        if config_name == "eval":
            raise ConfigError(
                f"{arg!r} is not key=value: write checkpoint={arg} (python eval.py checkpoint=PATH)"
            )
        raise ConfigError(
            f"{arg!r} is not key=value: {script} takes group=option and key=value arguments "
            f"(e.g. model=resnet18 recipe.epochs=2)"
        )


@functools.lru_cache(maxsize=64)
def _structure(config_name: str, groups: tuple[str, ...]) -> DictConfig:
    """The config composed with the command's group choices only (the keys a command may set)."""
    from hydra import compose

    return compose(config_name=config_name, overrides=list(groups))


def _suggest(word: str, node: DictConfig, prefix: str, extra: list[str]) -> str:
    names = sorted({*map(str, node.keys()), *extra} - {"hydra"})
    close = difflib.get_close_matches(word, names, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"{prefix}{c}" for c in close) + "?"
    where = f"under {prefix[:-1]}" if prefix else "at the top level"
    return f"the keys {where} are: {', '.join(names)}"


def _is_free_form(node: DictConfig) -> bool:
    return OmegaConf.get_type(node) is dict


def unknown_key(cfg: DictConfig, arg: str) -> str | None:
    """The one-line reason why ``arg`` sets a key that ``cfg`` lacks, or None when the key is known."""
    plus, key, _, _ = _split(arg)
    parts, node = key.split("."), cfg
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig):
            return None  # an index into a list: Hydra checks it
        if not isinstance(node, DictConfig):
            parent = ".".join(parts[:i])
            return f"{arg}: {parent} is a value, not a group of keys"
        if part in node.keys():
            node = node._get_node(part)
            continue
        prefix = "".join(f"{p}." for p in parts[:i])
        if i and _is_free_form(node):
            if plus:
                return None  # a new keyword for a free-form node (model.kwargs, a transform)
            return f"{key} is not set in {prefix[:-1]} (a free-form node): add it with +{arg}"
        groups = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()) if not i else []
        missing = prefix + part
        return f"unknown key {missing!r} in {arg}: " + _suggest(part, node, prefix, groups)
    return None


def check_keys(config_name: str, overrides: list[str]) -> None:
    """Raise ConfigError for the first override whose key the composed config does not have.

    Call inside ``initialize_config_dir(CONFIGS)``."""
    keyed = [o for o in overrides if "=" in o and not o.startswith("~")]
    groups = tuple(o for o in keyed if is_group(_split(o)[1]))
    if len(groups) == len(keyed):
        return
    try:
        cfg = _structure(config_name, groups)
    except Exception:  # noqa: BLE001  (a bad group choice: compose_job reports it)
        return
    for arg in keyed:
        if arg not in groups and (reason := unknown_key(cfg, arg)):
            raise ConfigError(reason)
