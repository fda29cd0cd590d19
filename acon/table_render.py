"""Comparison tables rendered from the cells of ``acon.tables.build_cells``: Markdown (README-ready, with the
paper's numbers and the deltas), CSV (one row per cell) and a LaTeX booktabs tabular with the Markdown rows."""

from __future__ import annotations

import csv
import io

from acon.tables import ACTIVATION_LABELS, METRIC_LABELS, PAPER_DATA, Cell, Incomplete, _act_rank, _signed


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
