"""Comparison tables from finished runs: each run's primary metric (top-1 error; mIoU or AP for transfer
tasks, ``results.json``'s ``primary_metric``) per (model, activation), mean ± std over seeds.

A run dir is any folder holding ``results.json``, ``config.yaml`` or ``last.pt`` (what the trainer
writes), or one a live run holds the lock of. Runs whose ``results.json`` says ``status: complete`` are
averaged; the others are listed as incomplete and never enter a mean. A run dir that a live run is
writing (its lock held: ``acon.runlock``) is listed as ``running``, whatever its files say; reading
never takes the lock. Runs of one cell trained with different recipes are an error.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from acon.console import epoch_text
from acon.recipes import group_by_cell, is_budget_recipe, mixed_families_message, mixed_recipes_message
from acon.runlock import LOCK_NAME, describe, running_holder

PAPER_CSV = Path(__file__).with_name("paper_results.csv")
PAPER_DATA = "imagenet"  # the paper's numbers only apply to runs on this dataset
PAPER_ACTIVATIONS = ("relu", "swish", "acon_c", "meta_acon", "acon_frelu")
ADDED_ACTIVATIONS = ("silu", "gelu", "mish", "hard_swish", "celu", "prelu", "frelu")
"""Activations the paper's tables do not have, shown after the paper's (docs/modern-activations.md)."""
ACTIVATIONS = PAPER_ACTIVATIONS + ADDED_ACTIVATIONS
ACTIVATION_LABELS = {
    "relu": "ReLU",
    "swish": "Swish",
    "acon_c": "ACON-C",
    "meta_acon": "Meta-ACON",
    "acon_frelu": "ACON-FReLU",
    "silu": "SiLU",
    "gelu": "GELU",
    "mish": "Mish",
    "hard_swish": "Hard-Swish",
    "celu": "CELU",
    "prelu": "PReLU",
    "frelu": "FReLU",
}
MARKERS = ("results.json", "config.yaml", "last.pt")
SKIP_DIRS = ("hparams", "tb")  # .hydra and other hidden dirs are skipped too
METRIC_LABELS = {"top1_err": "top-1 err %", "mIoU": "mIoU %", "AP": "AP"}
SET_ASIDE_PREFIX = "previous-"  # an earlier run's outputs moved aside by resume=none (acon.rundir)


class TableError(ValueError):
    """Runs that cannot be tabulated as asked (e.g. one cell mixing recipes); the message names them."""


@dataclass
class Run:
    """One complete run, read from its ``results.json``."""

    path: Path
    data: str
    model: str
    activation: str
    seed: int
    top1_err: float  # the primary metric's value: top-1 error % for classification, else ``metric``
    top5_err: float
    recipe: dict
    results: dict
    metric: str = "top1_err"


@dataclass
class Incomplete:
    """A run dir without a complete ``results.json`` (preempted or crashed), or one still being written
    (``reason`` starts with ``running``)."""

    path: Path
    reason: str
    model: str = "?"
    activation: str = "?"
    seed: str = "?"


@dataclass
class Cell:
    """Top-1 error of one (data, model, activation) over its seeds, with the paper's value and deltas."""

    data: str
    model: str
    activation: str
    values: list[float]
    seeds: list[int]
    runs: list[Path]
    paper: float | None = None
    delta_relu: float | None = None
    extra: dict = field(default_factory=dict)
    metric: str = "top1_err"  # what ``values`` are: top1_err, mIoU, AP

    @property
    def n(self) -> int:
        """Number of seeds averaged."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Mean top-1 error (%)."""
        return sum(self.values) / len(self.values)

    def text(self, pm: str = " ± ", n: str = " (n={})") -> str:
        """``mean ± std (n=K)``; a single run shows no spread: ``mean (n=1)``."""
        spread = f"{pm}{self.std:.2f}" if self.n > 1 else ""
        return f"{self.mean:.2f}{spread}{n.format(self.n)}"

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for a single seed)."""
        if len(self.values) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))

    @property
    def delta_paper(self) -> float | None:
        """Mean minus the paper's value (negative: lower error than published)."""
        return None if self.paper is None else self.mean - self.paper


def reference_rows(path: str | Path = PAPER_CSV) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of every row of the reference-results CSV, values stripped; ``recipe`` is ``""``
    for the paper's own rows (rows naming a recipe are other references, e.g. FFCV's budget numbers)."""
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            fields = {k: (v or "").strip() for k, v in row.items() if k is not None}
            fields.setdefault("recipe", "")
            yield i, fields


def load_paper_results(path: str | Path = PAPER_CSV) -> dict[tuple[str, str], float]:
    """The paper's published top-1 errors: {(model, activation): error %}; unpublished cells are absent.
    Rows naming a ``recipe`` are other references (FFCV's budget numbers: ``acon.budget_table``)."""
    out = {}
    for i, row in reference_rows(path):
        try:
            if row["top1_err"] and not row["recipe"]:
                out[(row["model"], row["activation"])] = float(row["top1_err"])
        except (KeyError, ValueError) as e:
            raise TableError(f"{path}:{i}: bad row {row} ({e})") from None
    return out


def find_run_dirs(roots: list[str | Path]) -> list[Path]:
    """Every run dir under ``roots`` (a root may itself be a run dir), sorted, without duplicates."""
    found = set()
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"run or sweep dir {str(root)!r} does not exist")
        for marker in (*MARKERS, LOCK_NAME):
            for p in root.rglob(marker):
                rel = p.parent.relative_to(root).parts
                if any(part.startswith((".", SET_ASIDE_PREFIX)) or part in SKIP_DIRS for part in rel):
                    continue
                if marker != LOCK_NAME or running_holder(p.parent) is not None:
                    found.add(p.parent)
    return sorted(found)


def _incomplete(path: Path, reason: str) -> Incomplete:
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        return Incomplete(path, reason)
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(cfg_file)
    except Exception:  # being written, or damaged: the row without its names
        return Incomplete(path, reason)
    return Incomplete(
        path,
        reason,
        str(OmegaConf.select(cfg, "model.name", default="?")),
        str(OmegaConf.select(cfg, "activation.name", default="?")),
        str(OmegaConf.select(cfg, "seed", default="?")),
    )


def _progress_note(path: Path) -> str:
    """Where the run's last metrics.jsonl record stands: an epoch end, a ``val_every_steps`` point or a
    ``max_steps`` stop (fractional epochs)."""
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        lines = [x for x in metrics.read_text().splitlines() if x.strip()]
        if lines:
            last = json.loads(lines[-1])
            epoch, step = last.get("epoch"), last.get("step", "?")
            where = "?" if epoch is None else epoch_text(epoch)
            return f"; last record at epoch {where} (step {step})"
    return "; no record in metrics.jsonl"


def collect(roots: list[str | Path]) -> tuple[list[Run], list[Incomplete]]:
    """Read every run dir under ``roots``: complete runs and the incomplete/crashed ones."""
    runs, incomplete = [], []
    for path in find_run_dirs(roots):
        holder = running_holder(path)
        if holder is not None:  # being written: not a finished row, whatever results.json says
            incomplete.append(_incomplete(path, f"running ({describe(holder)})" + _progress_note(path)))
            continue
        res_file = path / "results.json"
        if not res_file.is_file():
            incomplete.append(_incomplete(path, "no results.json" + _progress_note(path)))
            continue
        try:
            res = json.loads(res_file.read_text())
        except json.JSONDecodeError as e:
            incomplete.append(_incomplete(path, f"unreadable results.json ({e})"))
            continue
        if res.get("status") != "complete":
            incomplete.append(_incomplete(path, f"status={res.get('status')!r}" + _progress_note(path)))
            continue
        metric = str(res.get("primary_metric", "top1_err"))
        missing = [k for k in ("model", "activation", "seed", metric) if k not in res]
        if missing:
            raise TableError(f"{res_file}: missing keys {missing}")
        runs.append(
            Run(
                path=path,
                data=str(res.get("data", "?")),
                model=str(res["model"]),
                activation=str(res["activation"]),
                seed=int(res["seed"]),
                top1_err=float(res[metric]),
                top5_err=float(res.get("top5_err", math.nan)),
                recipe=(res.get("identity") or {}).get("recipe", {"name": res.get("recipe")}),
                results=res,
                metric=metric,
            )
        )
    return runs, incomplete


def build_cells(runs: list[Run], paper: dict[tuple[str, str], float] | None = None) -> list[Cell]:
    """Group runs by (data, model, activation); raise :class:`TableError` on mixed recipes or seeds twice."""
    paper = load_paper_results() if paper is None else paper
    mixed = mixed_families_message(runs)
    if mixed:
        raise TableError(mixed)
    cells = []
    for (data, model, act), by_recipe in group_by_cell(runs).items():
        if len(by_recipe) > 1:
            raise TableError(mixed_recipes_message((data, model, act), by_recipe))
        members = by_recipe[0]
        seeds = [r.seed for r in members]
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            detail = ", ".join(str(r.path) for r in members if r.seed in dup)
            raise TableError(f"cell ({data}, {model}, {act}) has seed(s) {dup} more than once: {detail}")
        members.sort(key=lambda r: r.seed)
        metrics = sorted({r.metric for r in members})
        if len(metrics) > 1:
            raise TableError(
                f"cell ({data}, {model}, {act}) mixes metrics {metrics}: {[str(r.path) for r in members]}"
            )
        cells.append(
            Cell(
                data,
                model,
                act,
                [r.top1_err for r in members],
                [r.seed for r in members],
                [r.path for r in members],
                paper=paper.get((model, act))
                if data == PAPER_DATA and metrics == ["top1_err"] and not is_budget_recipe(members[0].recipe)
                else None,
                metric=metrics[0],
            )
        )
    relu = {(c.data, c.model): c.mean for c in cells if c.activation == "relu"}
    for c in cells:
        if (c.data, c.model) in relu and c.activation != "relu":
            c.delta_relu = c.mean - relu[(c.data, c.model)]
    return sorted(cells, key=lambda c: (c.data, c.model, _act_rank(c.activation)))


def _act_rank(act: str) -> tuple[int, str]:
    return (ACTIVATIONS.index(act) if act in ACTIVATIONS else len(ACTIVATIONS), act)


def _signed(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:+.{digits}f}".replace("-", "−")
