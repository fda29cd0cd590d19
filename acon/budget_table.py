"""The budget view of finished runs (``make_table.py --view budget``): budget-recipe runs beside FFCV's
published numbers, the way the paper table sets our runs beside the paper.

FFCV's top-1 errors are rows of ``acon/paper_results.csv`` that name a ``recipe`` (``budget_16`` …) and a
``source``. Per (data, model, activation) cell: our mean ± std (n), the reference, Δ vs the reference
(negative: lower error than FFCV's) and Δ vs ReLU of the same model and recipe. A reference applies only to
full ImageNet-1k runs of the recipe it names; a class subset (``data.class_subset``) is labelled in the data
column and compared with ReLU only.
"""

from __future__ import annotations

from pathlib import Path

from acon.recipes import is_budget_recipe
from acon.tables import PAPER_CSV, PAPER_DATA, Cell, Run, TableError, _signed, reference_rows


def load_reference_results(path: str | Path = PAPER_CSV) -> dict[tuple[str, str, str], tuple[float, str]]:
    """{(model, activation, recipe): (top-1 error %, source)} of the rows that name a recipe."""
    out = {}
    for i, row in reference_rows(path):
        if not row["recipe"]:
            continue
        try:
            key = (row["model"], row["activation"], row["recipe"])
            out[key] = (float(row["top1_err"]), row.get("source", ""))
        except (KeyError, ValueError) as e:
            raise TableError(f"{path}:{i}: bad reference row {row} ({e})") from None
    return out


def budget_markdown(
    cells: list[Cell], runs: list[Run], refs: dict[tuple[str, str, str], tuple[float, str]]
) -> str:
    """The budget table: per cell ours, FFCV's reference, Δ vs reference and Δ vs ReLU; sources below."""
    others = [r for r in runs if not is_budget_recipe(r.recipe)]
    if not runs or others:
        detail = f": {others[0].path} (recipe {others[0].recipe.get('name', '?')})" if others else ""
        raise TableError(f"the budget view needs runs of budget recipes (recipe=budget_*) only{detail}")
    lines = [
        "| data | model | recipe | activation | top-1 err % (ours) | reference | Δ vs reference | Δ vs ReLU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sources: dict[str, int] = {}
    recipe_of = {
        r.path: str(r.recipe.get("name", "?")) for r in runs
    }  # one recipe per cell: the grouping rule
    for c in sorted(cells, key=lambda c: (c.data, c.model, recipe_of[c.runs[0]])):
        recipe = recipe_of[c.runs[0]]
        ref = refs.get((c.model, c.activation, recipe)) if c.data == PAPER_DATA else None
        ref_text, delta = "—", None
        if ref is not None:
            note = sources.setdefault(ref[1], len(sources) + 1)
            ref_text, delta = f"{ref[0]:.1f} [{note}]", c.mean - ref[0]
        lines.append(
            f"| {c.data} | {c.model} | {recipe} | {c.activation} | {c.text()} | {ref_text} | "
            f"{_signed(delta)} | {_signed(c.delta_relu)} |"
        )
    notes = [f"[{n}] {src}" for src, n in sources.items()]
    subset = any(c.data != PAPER_DATA for c in cells)
    if subset:
        notes.append(
            "The references are ImageNet-1k numbers: rows on other data (e.g. a class subset) have none."
        )
    return "\n".join(lines) + "\n" + ("\n" + "\n\n".join(notes) + "\n" if notes else "")
