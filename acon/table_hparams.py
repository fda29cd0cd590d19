"""TensorBoard HParams sessions from finished runs (what ``make_table.py`` writes to ``tables/hparams``): one session per run, with its
recipe keys as hyper-parameters and its metrics."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from acon.tables import Run


def write_hparams(runs: list[Run], out_dir: str | Path) -> list[Path]:
    """One TensorBoard HParams session per run under ``out_dir`` (replaced on each call)."""
    from torch.utils.tensorboard import SummaryWriter

    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    names: dict[str, int] = {}
    written = []
    for r in runs:
        name = r.path.name if r.path.name not in names else f"{r.path.parent.name}__{r.path.name}"
        names[name] = names.get(name, 0) + 1
        if names[name] > 1:
            name = f"{name}__{names[name]}"
        hp = {
            "data": r.data,
            "model": r.model,
            "activation": r.activation,
            "seed": r.seed,
            "recipe": str(r.recipe.get("name", "?")),
        }
        for k in ("lr", "batch_size", "weight_decay", "epochs", "iterations"):
            v = r.recipe.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                hp[f"recipe.{k}"] = v
        metrics = {f"hparam/{r.metric}": r.top1_err}
        if not math.isnan(r.top5_err):
            metrics["hparam/top5_err"] = r.top5_err
        for k in ("best_top1_err", "params", "flops", "images_per_s", "wall_time_s"):
            if isinstance(r.results.get(k), (int, float)):
                metrics[f"hparam/{k}"] = float(r.results[k])
        with SummaryWriter(out_dir / name) as w:
            w.add_hparams(hp, metrics, run_name=".")
        written.append(out_dir / name)
    return written
