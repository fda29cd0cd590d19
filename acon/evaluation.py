"""eval.py's logic: evaluate our checkpoints or the authors' released ones, exactly once per image."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from acon import checkpoint as ckpt
from acon import console, cpu_budget, distributed
from acon.report import write_json
from acon.tasks import get_task, task_of

REPLAY_BYTES = 1 << 30  # decoded validation batches kept for the next checkpoints, per data config


def _nbytes(obj) -> int:
    """Bytes of the tensors in a batch (nested tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


class SharedEvalData:
    """What the checkpoints of one eval.py call share: the datasets (file index, decoders) and, per data
    config, the decoded validation batches, replayed to every later checkpoint while they fit in
    ``budget`` bytes, so a sweep folder reads and decodes its validation set, and starts loader workers,
    once per call instead of once per checkpoint. The validation transforms are deterministic: a replayed
    batch is the batch the loader would give again."""

    def __init__(self, budget: int = REPLAY_BYTES, datasets: dict | None = None) -> None:
        self.budget, self.datasets = budget, {} if datasets is None else datasets
        self.batches: dict = {}  # key -> list of batches | None (too large: read again each time)

    def loader(self, task, run_cfg: DictConfig, batch_size: int, info: distributed.DistInfo):
        """The task's validation loader for ``run_cfg.data`` (workers start only when it is iterated), as a
        loader that replays the batches of an earlier checkpoint with the same data config."""
        from acon.data.resolution import budget_data

        key = (
            task.name,
            OmegaConf.to_yaml(budget_data(run_cfg.data, run_cfg.get("recipe")), resolve=True),  # eval size
            batch_size,
            info.rank,
            info.world_size,
        )
        return ReplayLoader(task.build_val_loader(run_cfg, batch_size, info, self.datasets), self, key)


class ReplayLoader:
    """Iterates ``loader`` once, keeping its batches in ``shared`` (up to its budget); later iterations
    with the same key replay them. Other attributes (``dataset``…) are the loader's."""

    def __init__(self, loader, shared: SharedEvalData, key: tuple) -> None:
        self.loader, self.shared, self.key = loader, shared, key

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        kept = self.shared.batches.get(self.key, [])
        if self.key in self.shared.batches:
            yield from kept if kept is not None else self.loader
            return
        size = 0
        for batch in self.loader:
            if kept is not None:
                size += _nbytes(batch)
                if size <= self.shared.budget:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        self.shared.batches[self.key] = kept  # only after a complete pass


def cli_data_overrides() -> list[str]:
    """The ``data.*`` overrides given on the command line (they win over a checkpoint's data config)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("data.")]


def is_ours(state: dict) -> bool:
    """True for this suite's checkpoints, False for anything else (e.g. the authors' {'state_dict': …})."""
    return state.get("format") == ckpt.FORMAT


def official_spec(state: dict, path: Path, cfg: DictConfig) -> tuple[str, str, dict]:
    """(model name, activation, model kwargs) of an authors' checkpoint.

    ``official.*`` wins; otherwise what ``scripts/convert_official_checkpoint.py`` recorded in the file.
    Without either, the activation is inferred from the parameter names, as the converter does.
    """
    import models
    from models.official import infer_official_activation

    recorded = state if isinstance(state.get("model"), str) and "state_dict" in state else {}
    name = cfg.official.model or recorded.get("model")
    if not name:
        raise ckpt.CheckpointError(
            f"{path} is neither an acon-suite checkpoint nor one written by "
            f"scripts/convert_official_checkpoint.py; for an authors' released checkpoint pass "
            f"official.model=<one of {', '.join(models.list_models())}> (official.activation=<relu|swish|"
            f"acon_c|meta_acon|acon_frelu> is inferred from its keys when not given)"
        )
    act = cfg.official.activation or recorded.get("activation") or infer_official_activation(state)
    if cfg.official.get("model_kwargs"):
        kw = OmegaConf.to_container(cfg.official.model_kwargs, resolve=True)
    else:
        kw = dict(recorded.get("model_kwargs") or {})
    return str(name), str(act), kw


def model_for_checkpoint(
    state: dict, path: Path, cfg: DictConfig
) -> tuple[torch.nn.Module, DictConfig, dict]:
    """The model with the checkpoint's weights, the data config to evaluate it with, and what the model is
    (``{"model", "activation", "seed", "task"}``, seed empty for an authors' checkpoint).

    A transfer task's network is built without reading its ``backbone.checkpoint``: the checkpoint holds
    every weight, so the ImageNet file may have moved or gone."""
    import models

    if is_ours(state):
        run_cfg = OmegaConf.create(state["config"])
        data = run_cfg.data if cfg.data_from_checkpoint else cfg.data
        data = OmegaConf.merge(
            data, OmegaConf.from_dotlist([o.split("data.", 1)[1] for o in cli_data_overrides()])
        )
        task = task_of(run_cfg)
        model = task.build_model(run_cfg, load_backbone=False)
        weights = state["model"]
        if cfg.use_ema:
            if not state.get("ema"):
                raise ckpt.CheckpointError(f"{path} has no EMA weights (use_ema=true)")
            weights = {k.removeprefix("module."): v for k, v in state["ema"].items()}
        ckpt.load_model_state(model, weights, str(path))
        about = {"model": run_cfg.model.name, "activation": run_cfg.activation.name, "seed": run_cfg.seed}
        return model, data, {**about, "task": task.name}
    name, act, kw = official_spec(state, path, cfg)
    kw["num_classes"] = int(cfg.data.num_classes)
    model = models.create_model(name, activation=act, **kw)
    try:
        weights = models.convert_official_state_dict(state, name, act, **kw)
    except (KeyError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: {e.args[0] if isinstance(e, KeyError) else e}") from None
    ckpt.load_model_state(model, weights, str(path))
    data = OmegaConf.merge(cfg.data, {"preprocess": "bgr_255"})
    return model, data, {"model": name, "activation": act, "seed": "", "task": "classification"}


def evaluate_checkpoint(
    path: Path, cfg: DictConfig, info: distributed.DistInfo, shared: SharedEvalData | dict | None = None
) -> dict:
    """The task's metrics (top-1/top-5 error, mIoU, AP) of one checkpoint on its validation set
    (``shared``: what the checkpoints of one call share, see :class:`SharedEvalData`)."""
    state = ckpt.load_checkpoint(path, map_location="cpu")
    model, data, about = model_for_checkpoint(state, path, cfg)
    if "num_workers" in cfg.data:  # this call's loader workers, not those of the machine that trained
        data.num_workers = cfg.data.num_workers
    run_cfg = OmegaConf.create(state["config"]) if is_ours(state) else OmegaConf.create({})
    run_cfg.data, run_cfg.trainer = data, cfg.trainer
    task = task_of(run_cfg) if is_ours(state) else get_task(about["task"], run_cfg)
    model = model.to(info.device)
    shared = shared if isinstance(shared, SharedEvalData) else SharedEvalData(datasets=shared)
    loader = shared.loader(task, run_cfg, int(cfg.batch_size), info)
    metrics = task.evaluate(model, loader, run_cfg, info)
    return {"checkpoint": str(path), **about, **metrics}


def checkpoints_in(target: Path) -> list[Path]:
    """A single file, or every *.pt under a folder, run dirs of a sweep included (sorted; hidden folders
    such as .hydra are skipped)."""
    if target.is_dir():
        found = sorted(
            p
            for p in target.rglob("*.pt")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(target).parts)
        )
        if not found:
            raise FileNotFoundError(f"no *.pt checkpoints in {target} or its sub-folders")
        return found
    if not target.is_file():
        raise FileNotFoundError(f"checkpoint={str(target)!r} does not exist")
    return [target]


def run_eval(cfg: DictConfig) -> list[dict]:
    """Evaluate ``cfg.checkpoint`` (a file or a folder); rank 0 prints and writes the rows."""
    target = Path(cfg.checkpoint).expanduser()
    paths = checkpoints_in(target)
    plan = cpu_budget.configure(cfg)
    info = distributed.setup(cfg.trainer.device, float(cfg.trainer.dist_timeout_s))
    if info.is_main:
        console.log.info(f"acon: {len(paths)} checkpoint(s); {plan.line()}")
    shared = SharedEvalData()
    try:
        rows = [evaluate_checkpoint(p, cfg, info, shared) for p in paths]
    finally:
        distributed.teardown()
    if info.is_main:
        for r in rows:
            seed = f" seed {r['seed']}" if r["seed"] != "" else ""
            if "top1_err" in r:
                top5 = f"  top-5 error {r['top5_err']:.2f}%" if "top5_err" in r else ""
                what = f"top-1 error {r['top1_err']:.2f}%{top5}"
            else:
                what = get_task(r["task"]).metrics_text(r)
            console.log.info(
                f"{r['checkpoint']} ({r['model']}, {r['activation']}{seed}): {what}  ({r['count']} images)"
            )
        console.log.info(f"wrote {write_rows(rows, target, cfg.out)}")
    return rows


def write_rows(rows: list[dict], target: Path, out: str | None) -> Path:
    """eval.json for one checkpoint; eval.csv (one row per checkpoint: model, activation, seed, errors)
    for a folder."""
    if len(rows) == 1 and not target.is_dir():
        path = Path(out) if out else target.with_suffix(".eval.json")
        return write_json(path, rows[0])
    path = Path(out) if out else target / "eval.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
