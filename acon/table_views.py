"""Two more views of finished runs: the TFNet table and the SENet comparison of the authors' README.

- ``tfnet_markdown``: the TFNet table's form. Every TFNet cell with a learned activation is a candidate;
  every other cell (MobileNetV2, ShuffleNetV2, TFNet with ReLU) is a baseline and joins the candidate
  nearest in FLOPs (log scale), which makes the README's tiers of similar FLOPs. Per cell: FLOPs and
  params (from the runs' ``results.json``, at the run's input size), top-1 error, and for a candidate the
  gain over the best (lowest-error) baseline of its tier, positive when the candidate is better.
- ``se_markdown``: per model, the relative top-1 accuracy improvement over ReLU of squeeze-excite
  (the ``<model>_se`` cell with ReLU) and of Meta-ACON, side by side. The published chart has no numbers
  as text, so only ours are shown.
"""

from __future__ import annotations

import math

from acon.tables import PAPER_DATA, Cell, Run, TableError

CANDIDATE_FAMILY = "tfnet"
BASELINE_ACTIVATION = "relu"
SE_SUFFIX = "_se"


def _counts(runs: list[Run]) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(data, model, activation) -> (FLOPs, params) from the runs' results.json."""
    out = {}
    for r in runs:
        if isinstance(r.results.get("flops"), int) and isinstance(r.results.get("params"), int):
            out[(r.data, r.model, r.activation)] = (r.results["flops"], r.results["params"])
    return out


def _is_candidate(c: Cell) -> bool:
    return c.model.startswith(CANDIDATE_FAMILY) and c.activation != BASELINE_ACTIVATION


def _si(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.{3 if unit == 'G' else 1}f}{unit}"
    return str(n)


def tfnet_tiers(cells: list[Cell], runs: list[Run]) -> list[tuple[Cell, list[Cell]]]:
    """(candidate, baselines of similar FLOPs) per TFNet cell, by data set and increasing FLOPs."""
    counts = _counts(runs)
    missing = [f"{c.model}/{c.activation}" for c in cells if (c.data, c.model, c.activation) not in counts]
    if missing:
        raise TableError(f"runs without flops/params in results.json: {', '.join(missing)}")
    flops = {id(c): counts[(c.data, c.model, c.activation)][0] for c in cells}
    candidates = [c for c in cells if _is_candidate(c)]
    if not candidates:
        raise TableError(
            f"the TFNet view needs at least one {CANDIDATE_FAMILY}* run with a learned activation"
        )
    tiers = {id(c): (c, []) for c in candidates}
    for b in (c for c in cells if not _is_candidate(c)):
        same = [c for c in candidates if c.data == b.data]
        if same:
            nearest = min(same, key=lambda c: abs(math.log(flops[id(c)] / flops[id(b)])))
            tiers[id(nearest)][1].append(b)
    ordered = sorted(tiers.values(), key=lambda t: (t[0].data, flops[id(t[0])]))
    return [(c, sorted(bs, key=lambda b: flops[id(b)])) for c, bs in ordered]


def tfnet_markdown(cells: list[Cell], runs: list[Run]) -> str:
    """The TFNet table: FLOPs, params, top-1 error (and paper) per row, gain vs the tier's best baseline."""
    counts = _counts(runs)
    lines = [
        "| data | model | activation | FLOPs | params | top-1 err % (ours) | paper | Δ vs best baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cand, baselines in tfnet_tiers(cells, runs):
        best = min(baselines, key=lambda b: b.mean, default=None)
        for c in [*baselines, cand]:
            f, p = counts[(c.data, c.model, c.activation)]
            paper = "—" if c.paper is None else f"{c.paper:.1f}"
            delta = "" if c is not cand or best is None else f"{best.mean - c.mean:+.2f} (vs {best.model})"
            if c is cand and best is not None and c.paper is not None and best.paper is not None:
                paper += f" ({best.paper - c.paper:+.1f})"
            lines.append(
                f"| {c.data} | {c.model} | {c.activation} | {_si(f)} | {_si(p)} | "
                f"{c.text()} | {paper} | {delta} |"
            )
    note = (
        ""
        if all(c.data == PAPER_DATA for c in cells)
        else "\nFLOPs at each run's input size (not 224x224).\n"
    )
    return "\n".join(lines) + "\n" + note


def _rel_gain(base: Cell, other: Cell | None) -> str:
    """Relative top-1 accuracy improvement of ``other`` over ``base``, in percent."""
    if other is None:
        return "—"
    return f"{100 * ((100 - other.mean) - (100 - base.mean)) / (100 - base.mean):+.2f}%"


def se_markdown(cells: list[Cell]) -> str:
    """Relative top-1 accuracy improvement over ReLU of SE and of Meta-ACON, per (data, model)."""
    by = {(c.data, c.model, c.activation): c for c in cells}
    bases = sorted({(c.data, c.model) for c in cells if not c.model.endswith(SE_SUFFIX)})
    lines = [
        "| data | model | top-1 acc ReLU | + SE | rel. gain SE | Meta-ACON | rel. gain Meta-ACON |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = 0
    for data, model in bases:
        relu = by.get((data, model, BASELINE_ACTIVATION))
        se = by.get((data, model + SE_SUFFIX, BASELINE_ACTIVATION))
        meta = by.get((data, model, "meta_acon"))
        if relu is None or (se is None and meta is None):
            continue
        rows += 1
        acc = [("—" if c is None else f"{100 - c.mean:.2f}") for c in (relu, se, meta)]
        lines.append(
            f"| {data} | {model} | {acc[0]} | {acc[1]} | {_rel_gain(relu, se)} | {acc[2]} | {_rel_gain(relu, meta)} |"
        )
    if not rows:
        raise TableError("the SE view needs, per model, a ReLU run and a ReLU run of <model>_se or Meta-ACON")
    return "\n".join(lines) + "\n"
