"""eval.py's logic: evaluate our checkpoints or the authors' released ones, exactly once per image."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from acon import checkpoint as ckpt
from acon import distributed
from acon.builders import build_model
from acon.data import build_datasets, build_eval_loader
from acon.engine import evaluate
from acon.report import write_json


def cli_data_overrides() -> list[str]:
    """The ``data.*`` overrides given on the command line (they win over a checkpoint's data config)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("data.")]


def is_ours(state: dict) -> bool:
    """True for this suite's checkpoints, False for anything else (e.g. the authors' {'state_dict': …})."""
    return state.get("format") == ckpt.FORMAT


def model_for_checkpoint(state: dict, path: Path, cfg: DictConfig) -> tuple[torch.nn.Module, DictConfig]:
    """The model with the checkpoint's weights and the data config to evaluate it with."""
    import models

    if is_ours(state):
        run_cfg = OmegaConf.create(state["config"])
        data = run_cfg.data if cfg.data_from_checkpoint else cfg.data
        data = OmegaConf.merge(
            data, OmegaConf.from_dotlist([o.split("data.", 1)[1] for o in cli_data_overrides()])
        )
        model = build_model(run_cfg.model, run_cfg.activation, int(run_cfg.data.num_classes))
        weights = state["model"]
        if cfg.use_ema:
            if not state.get("ema"):
                raise ckpt.CheckpointError(f"{path} has no EMA weights (use_ema=true)")
            weights = {k.removeprefix("module."): v for k, v in state["ema"].items()}
        ckpt.load_model_state(model, weights, str(path))
        return model, data
    name, act = cfg.official.model, cfg.official.activation
    if not name or not act:
        raise ckpt.CheckpointError(
            f"{path} is not an acon-suite checkpoint; to evaluate an authors' released checkpoint pass "
            f"official.model=<one of {', '.join(models.list_models())}> and "
            f"official.activation=<relu|swish|acon_c|meta_acon|acon_frelu>"
        )
    kw = (
        OmegaConf.to_container(cfg.official.model_kwargs, resolve=True)
        if cfg.official.get("model_kwargs")
        else {}
    )
    kw["num_classes"] = int(cfg.data.num_classes)
    model = models.create_model(name, activation=act, **kw)
    ckpt.load_model_state(model, models.convert_official_state_dict(state, name, act, **kw), str(path))
    data = OmegaConf.merge(cfg.data, {"preprocess": "bgr_255"})
    return model, data


def evaluate_checkpoint(path: Path, cfg: DictConfig, info: distributed.DistInfo) -> dict:
    """Top-1/top-5 error of one checkpoint on its validation set."""
    state = ckpt.load_checkpoint(path, map_location="cpu")
    model, data = model_for_checkpoint(state, path, cfg)
    model = model.to(info.device)
    _, val_set = build_datasets(data)
    loader = build_eval_loader(val_set, data, int(cfg.batch_size), info.rank, info.world_size)
    metrics = evaluate(model, loader, info.device, cfg.trainer.precision, bool(cfg.trainer.channels_last))
    return {"checkpoint": str(path), **metrics}


def checkpoints_in(target: Path) -> list[Path]:
    """A single file, or every *.pt in a folder (sorted)."""
    if target.is_dir():
        found = sorted(target.glob("*.pt"))
        if not found:
            raise FileNotFoundError(f"no *.pt checkpoints in {target}")
        return found
    if not target.is_file():
        raise FileNotFoundError(f"checkpoint={str(target)!r} does not exist")
    return [target]


def run_eval(cfg: DictConfig) -> list[dict]:
    """Evaluate ``cfg.checkpoint`` (a file or a folder); rank 0 prints and writes the rows."""
    target = Path(cfg.checkpoint).expanduser()
    paths = checkpoints_in(target)
    info = distributed.setup(cfg.trainer.device, float(cfg.trainer.dist_timeout_s))
    try:
        rows = [evaluate_checkpoint(p, cfg, info) for p in paths]
    finally:
        distributed.teardown()
    if info.is_main:
        for r in rows:
            print(
                f"{r['checkpoint']}: top-1 error {r['top1_err']:.2f}%  top-5 error {r['top5_err']:.2f}%  "
                f"({r['count']} images)",
                file=sys.stdout,
                flush=True,
            )
        write_rows(rows, target, cfg.out)
    return rows


def write_rows(rows: list[dict], target: Path, out: str | None) -> Path:
    """eval.json for one checkpoint; eval.csv (one row per checkpoint) for a folder."""
    if len(rows) == 1 and not target.is_dir():
        path = Path(out) if out else target.with_suffix(".eval.json")
        return write_json(path, rows[0])
    path = Path(out) if out else target / "eval.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
