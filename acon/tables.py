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
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        lines = [x for x in metrics.read_text().splitlines() if x.strip()]
        if lines:
            return f"; last finished epoch {json.loads(lines[-1]).get('epoch', '?')}"
    return "; no epoch finished"


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


def _grid(cells: list[Cell]) -> tuple[list[tuple[str, str]], list[str], dict]:
    rows = list(dict.fromkeys((c.data, c.model) for c in cells))
    acts = sorted({c.activation for c in cells}, key=_act_rank)
    return rows, acts, {(c.data, c.model, c.activation): c for c in cells}


def _row_label(data: str, model: str, all_rows: list[tuple[str, str]]) -> str:
    return model if {d for d, _ in all_rows} == {PAPER_DATA} else f"{model} ({data})"


def to_markdown(cells: list[Cell], incomplete: list[Incomplete] = ()) -> str:
    """README-ready table: per model a row of ours (mean ± std, n), then paper, Δ paper and Δ ReLU rows."""
    rows, acts, by = _grid(cells)
    head = ["model", "", *(ACTIVATION_LABELS.get(a, a) for a in acts)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for data, model in rows:
        got = [by.get((data, model, a)) for a in acts]
        label, metric = _row_label(data, model, rows), _row_metric(got)
        ours = [c.text() if c else "" for c in got]
        lines.append(f"| {label} | {METRIC_LABELS.get(metric, metric)} | " + " | ".join(ours) + " |")
        if metric != "top1_err":  # transfer tasks: the paper's numbers are not available, left empty
            lines.append("| | paper | " + " | ".join("" for _ in got) + " |")
        if any(c and c.paper is not None for c in got):
            lines.append("| | paper | " + " | ".join(_fmt(c and c.paper, 1) for c in got) + " |")
            lines.append("| | Δ vs paper | " + " | ".join(_signed(c and c.delta_paper) for c in got) + " |")
        if any(c and c.delta_relu is not None for c in got):
            lines.append("| | Δ vs ReLU | " + " | ".join(_signed(c and c.delta_relu) for c in got) + " |")
    if incomplete:
        lines += ["", "Incomplete or crashed runs (not averaged):", ""]
        lines += [f"- `{r.path}` ({r.model}, {r.activation}, seed {r.seed}): {r.reason}" for r in incomplete]
    return "\n".join(lines) + "\n"


def _row_metric(cells: list) -> str:
    return next((c.metric for c in cells if c), "top1_err")


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def to_csv(cells: list[Cell]) -> str:
    """One row per cell: data, model, activation, n, mean, std, paper, deltas, seeds, run dirs and the metric
    (the ``top1_err_*`` columns hold the cell's ``metric``: mIoU or AP for transfer tasks)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["data", "model", "activation", "n", "top1_err_mean", "top1_err_std", "paper_top1_err"]
        + ["delta_paper", "delta_relu", "seeds", "runs", "metric"]
    )
    for c in cells:
        w.writerow(
            [c.data, c.model, c.activation, c.n, f"{c.mean:.4f}", f"{c.std:.4f}" if c.n > 1 else ""]
            + ["" if c.paper is None else c.paper, "" if c.delta_paper is None else f"{c.delta_paper:.4f}"]
            + ["" if c.delta_relu is None else f"{c.delta_relu:.4f}", " ".join(map(str, c.seeds))]
            + [" ".join(str(p) for p in c.runs), c.metric]
        )
    return buf.getvalue()


def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


TEX_PM = r" \pm "


def to_latex(cells: list[Cell]) -> str:
    """A booktabs tabular with the same rows as the Markdown table."""
    rows, acts, by = _grid(cells)
    out = [
        r"\begin{tabular}{ll" + "c" * len(acts) + "}",
        r"\toprule",
        "Model & & " + " & ".join(_tex(ACTIVATION_LABELS.get(a, a)) for a in acts) + r" \\",
        r"\midrule",
    ]

    def tex_signed(x):
        return "--" if x is None else f"${x:+.2f}$"

    for data, model in rows:
        got = [by.get((data, model, a)) for a in acts]
        ours = [f"${c.text(pm=TEX_PM, n='')}$ ({c.n})" if c else "" for c in got]
        metric = METRIC_LABELS.get(_row_metric(got), _row_metric(got)).removesuffix(" %")
        out.append(f"{_tex(_row_label(data, model, rows))} & {_tex(metric)} & " + " & ".join(ours) + r" \\")
        if any(c and c.paper is not None for c in got):
            out.append(
                " & paper & "
                + " & ".join("--" if not c or c.paper is None else f"{c.paper:.1f}" for c in got)
                + r" \\"
            )
            out.append(
                r" & $\Delta$ paper & " + " & ".join(tex_signed(c and c.delta_paper) for c in got) + r" \\"
            )
        if any(c and c.delta_relu is not None for c in got):
            out.append(
                r" & $\Delta$ ReLU & " + " & ".join(tex_signed(c and c.delta_relu) for c in got) + r" \\"
            )
        out.append(r"\midrule")
    out[-1] = r"\bottomrule"
    out.append(r"\end{tabular}")
    return "\n".join(out) + "\n"


def write_hparams(runs: list[Run], out_dir: str | Path) -> list[Path]:
    """One TensorBoard HParams session per run under ``out_dir`` (replaced on each call)."""
    import shutil

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
