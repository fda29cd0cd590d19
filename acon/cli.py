"""The front of train.py and eval.py: a bad command line ends in one ``error:`` line and exit status 2.

Before Hydra starts the run, :func:`check_command` composes the command line against the typed schemas
(``acon.config_schema``) and checks ranges and choices (``acon.validate``); wrong types, values out of
range, unknown options and missing files are reported as ``error: key=value ...: must be ...``; an
unknown key, with or without ``+``, as ``error: unknown key ...: did you mean ...?`` (:mod:`acon.cli_keys`).
Hydra's own flags are left to Hydra. ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import ValidationError

import acon.config_schema  # noqa: F401  (registers the schemas with Hydra)
from acon.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MAX_SWEEP_JOBS = 256  # sweep combinations composed up front; larger sweeps check the first ones
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def full_traceback() -> bool:
    """True when the user asked Hydra for full tracebacks."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(message: str, status: int = 2) -> None:
    """Print ``error: message`` on one line and exit at once.

    The exit skips interpreter teardown: DataLoader workers ignore SIGTERM (so a signal to the process
    group becomes a checkpoint), and multiprocessing's exit handler would wait forever for the workers it
    terminates. The workers die with this process instead (``PR_SET_PDEATHSIG``, acon.preempt).
    """
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    logging.shutdown()  # flush the run's train.log
    sys.stdout.flush()
    os._exit(status)


def one_line(message: str) -> str:
    """The message itself; for an error re-raised from a DataLoader worker, the worker's own message."""
    if "Original Traceback" in message:
        last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
        message = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    return " ".join(message.split())


@contextlib.contextmanager
def one_line_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn ``kinds`` of exceptions (and ConfigError) into one ``error:`` line and exit status 2."""
    try:
        yield
    except (ConfigError, *kinds) as e:
        if full_traceback():
            raise
        fail(str(e))


def command_jobs(argv: list[str]) -> list[list[str]] | None:
    """The overrides of each job the command line would run (a sweep expanded), or None when it holds
    flags other than ``-m`` (``--cfg``, ``--help``, ...), which Hydra handles itself."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    args = [a for a in argv if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in args):
        return None
    args = [a for a in args if not a.lstrip("+~").startswith("hydra")]  # Hydra's own settings
    if not multirun:
        return [args]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(args)
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return jobs[:MAX_SWEEP_JOBS]


def _field_rule(schema: type | None, name: str) -> tuple[str, object | None]:
    """(the field's type in words, its ``allowed`` rule) from the schema dataclass."""
    if schema is None or not dataclasses.is_dataclass(schema):
        return "a valid value", None
    for f in dataclasses.fields(schema):
        if f.name == name:
            hint = _resolve_hint(schema, name)
            optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
            base = next((a for a in getattr(hint, "__args__", (hint,)) if a is not type(None)), hint)
            words = _TYPE_WORDS.get(base, "a valid value")
            return words + (" or null" if optional else ""), f.metadata.get("allowed")
    return "a valid value", None


def _resolve_hint(schema: type, name: str):
    import typing

    return typing.get_type_hints(schema)[name]


def _given_value(key: str, overrides: list[str], message: str) -> str:
    for o in overrides:
        k, sep, v = o.lstrip("+~").partition("=")
        if sep and k == key:
            return v
    m = re.search(r"Value '([^']*)'", message)
    return m.group(1) if m else "null"


def type_error(e: ValidationError, overrides: list[str]) -> ConfigError:
    """A schema type error as ``key=value is not allowed: must be <type or rule>``."""
    key = str(e.full_key)
    words, rule = _field_rule(getattr(e, "object_type", None), key.rsplit(".", 1)[-1])
    allowed = rule.describe() if rule is not None else words
    if rule is not None and "or null" in words:
        allowed += " or null"
    return ConfigError(f"{key}={_given_value(key, overrides, str(e))} is not allowed: must be {allowed}")


def compose_job(config_name: str, overrides: list[str]) -> DictConfig | None:
    """The composed config, a ConfigError for a schema type error, or None when Hydra itself should
    report the problem (unknown keys and the like). Call inside ``initialize_config_dir(CONFIGS)``."""
    from hydra import compose
    from hydra.errors import HydraException

    try:
        return compose(config_name=config_name, overrides=overrides)
    except (HydraException, ValidationError) as e:
        cause = e if isinstance(e, ValidationError) else e.__cause__
        if isinstance(cause, ValidationError) and cause.full_key:
            raise type_error(cause, overrides) from e
        return None


def check_command(argv: list[str], config_name: str, check: Callable[[DictConfig], None]) -> None:
    """Raise ConfigError for the first bad job of the command line (types, options, ranges, files)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from acon.cli_keys import check_arguments, check_keys
    from acon.validate import check_cli_groups

    check_arguments(argv, config_name)
    check_cli_groups(argv, CONFIGS)
    check_launcher(argv)
    launched_here = not any(a.lstrip("+").startswith("hydra/launcher=") for a in argv)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            for overrides in command_jobs(argv) or []:
                check_keys(config_name, overrides)
                cfg = compose_job(config_name, overrides)
                if cfg is None:
                    return
                check(cfg)
                check_model_input(cfg)
                if launched_here:
                    check_device(cfg)
    finally:
        GlobalHydra.instance().clear()


def preflight(
    config_name: str,
    check: Callable[[DictConfig], None],
    argv: list[str] | None = None,
    errors: tuple[type[BaseException], ...] = (),
) -> None:
    """``check_command`` on ``sys.argv``: exit 2 with one ``error:`` line on a bad command line (or one
    of ``errors`` that ``check`` raises)."""
    with one_line_errors(*errors):
        check_command(sys.argv[1:] if argv is None else argv, config_name, check)


def check_device(cfg: DictConfig) -> None:
    """``trainer.device=cuda`` (trainer=gpu, the paper experiments) needs a CUDA device on this machine."""
    from omegaconf import OmegaConf

    if OmegaConf.select(cfg, "trainer.device", default=None) == "cuda":
        import torch

        from acon.distributed import NO_CUDA

        if not torch.cuda.is_available():
            raise ConfigError(NO_CUDA)


def check_launcher(argv: list[str]) -> None:
    """``hydra/launcher=slurm`` needs SLURM's ``sbatch`` on this machine (and the submitit plugin)."""
    import importlib.util
    import shutil

    launchers = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra/launcher=")]
    if "slurm" not in launchers:
        return
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        raise ConfigError(
            "hydra/launcher=slurm needs the submitit launcher: pip install hydra-submitit-launcher"
        )
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]  # submitit needs both
    if missing:
        raise ConfigError(
            f"hydra/launcher=slurm submits through SLURM, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH on this machine: run the command on a SLURM "
            "login node, or drop hydra/launcher=slurm to run the jobs here one by one"
        )


def check_model_input(cfg: DictConfig) -> None:
    """A timm/torchvision classifier takes ``data.img_size`` inputs (a dry forward on the meta device)."""
    from omegaconf import OmegaConf

    from acon.builders import EXTERNAL_ARCHS, external_model_name

    model_cfg = OmegaConf.select(cfg, "model", default=None)
    if model_cfg is None or model_cfg.get("arch") not in EXTERNAL_ARCHS:
        return
    if OmegaConf.select(cfg, "task.name", default="classification") != "classification":
        return  # a transfer task runs the feature body at its own sizes (acon.tasks.backbone checks it)
    if OmegaConf.is_missing(model_cfg, "timm_name" if model_cfg.arch == "timm" else "tv_name"):
        return
    kwargs = OmegaConf.to_container(model_cfg.kwargs, resolve=True) if model_cfg.get("kwargs") else {}
    size = int(cfg.data.img_size)
    problem = _dry_forward(
        str(model_cfg.arch), external_model_name(model_cfg), size, repr(sorted(kwargs.items()))
    )
    if problem:
        key = "model.timm_name" if model_cfg.arch == "timm" else "model.tv_name"
        raise ConfigError(
            f"{key}={external_model_name(model_cfg)} does not take data.img_size={size} px inputs "
            f"({problem}): set data.img_size to the size it takes, or pick another model"
        )


@functools.lru_cache(maxsize=32)
def _dry_forward(arch: str, name: str, size: int, kwargs_repr: str) -> str | None:
    """Why a forward pass of (2, C, size, size) fails on the meta device, or None (also when unknown)."""
    import ast

    import torch

    kwargs = dict(ast.literal_eval(kwargs_repr))
    try:
        with torch.device("meta"):
            if arch == "timm":
                import timm

                model = timm.create_model(name, pretrained=False, **kwargs)
            else:
                import torchvision

                model = torchvision.models.get_model(name, weights=None, **kwargs)
            x = torch.empty(2, int(kwargs.get("in_chans", 3)), size, size)
    except Exception:  # noqa: BLE001  (a constructor problem: the run reports it with its own message)
        return None
    expected = getattr(model, "pretrained_cfg", {}).get("input_size")
    try:
        with torch.no_grad():
            model.eval()(x)
    except (AssertionError, RuntimeError, ValueError) as e:
        if "meta" in str(e).lower():
            return None  # an operation the meta device cannot run: not a size problem
        where = f"; it expects {expected[-2]}x{expected[-1]} px (timm's pretrained_cfg)" if expected else ""
        return one_line(str(e)).rstrip(".") + where
    except Exception:  # noqa: BLE001
        return None
    return None
