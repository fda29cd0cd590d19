"""Which runs may be averaged together: the one grouping rule of the tables and the curve plots.

Runs are grouped by (data, model, activation) and, inside that cell, by their recipe (the resolved
``recipe`` config recorded in ``results.json``). Runs with different recipes are never averaged:
``make_table.py`` refuses such a cell, ``plot_curves.py`` draws one line per recipe. Both name the recipe
keys that differ. A table never holds budget-recipe runs (``recipe.resolution``: progressive resizing, compared
with FFCV's published numbers) beside runs of the paper's recipes (compared with the paper).
"""

from __future__ import annotations

import json
from typing import Any, Protocol, TypeVar


class HasRecipe(Protocol):
    """A run as read by ``acon.tables.collect``: where it is, what it trained, and with which recipe."""

    data: str
    model: str
    activation: str
    recipe: dict


R = TypeVar("R", bound=HasRecipe)
CellKey = tuple[str, str, str]


def flat_recipe(recipe: dict, prefix: str = "") -> dict[str, Any]:
    """The recipe as ``{dotted.key: value}`` (nested sections flattened)."""
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            out.update(flat_recipe(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_keys(recipes: list[dict]) -> list[str]:
    """The dotted recipe keys whose values are not the same in all ``recipes`` (absent is the same as null:
    a key added to the schema with a null default leaves earlier runs' recipes unchanged)."""
    flat = [flat_recipe(r) for r in recipes]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1]


def recipe_key(recipe: dict) -> str:
    """The recipe as one comparable string: its non-null keys, sorted."""
    return json.dumps(
        {k: v for k, v in flat_recipe(recipe).items() if v is not None}, sort_keys=True, default=str
    )


def describe(recipe: dict, keys: list[str]) -> str:
    """``key=value, ...`` for ``keys`` of one recipe (``key=-`` where the recipe lacks the key)."""
    flat = flat_recipe(recipe)
    return ", ".join(f"{k}={flat[k]}" if k in flat else f"{k}=-" for k in keys)


def group_by_cell(runs: list[R]) -> dict[CellKey, list[list[R]]]:
    """``{(data, model, activation): [runs of one recipe, runs of another recipe, ...]}``, in input order."""
    cells: dict[CellKey, dict[str, list[R]]] = {}
    for run in runs:
        by_recipe = cells.setdefault((run.data, run.model, run.activation), {})
        by_recipe.setdefault(recipe_key(run.recipe), []).append(run)
    return {cell: list(by_recipe.values()) for cell, by_recipe in cells.items()}


def mixed_recipes_message(cell: CellKey, groups: list[list[Any]]) -> str:
    """Why one cell cannot be averaged: the recipe keys that differ and each run's values of them."""
    keys = differing_keys([g[0].recipe for g in groups])
    runs = "; ".join(f"{r.path} ({describe(r.recipe, keys)})" for g in groups for r in g)
    return (
        f"cell ({', '.join(cell)}) mixes {len(groups)} different recipes, refusing to average them; "
        f"they differ in {', '.join(keys)}: {runs}. Pass the run dirs of one recipe at a time."
    )


def is_budget_recipe(recipe: dict) -> bool:
    """A budget recipe (``recipe=budget_*``): trained with progressive resizing (``recipe.resolution``)."""
    return bool(recipe.get("resolution")) or str(recipe.get("name", "")).startswith("budget_")


def mixed_families_message(runs: list[Any]) -> str | None:
    """Why these runs cannot share one table (budget-recipe runs beside others), or None when they can."""
    budget = [r for r in runs if is_budget_recipe(r.recipe)]
    if not budget or len(budget) == len(runs):
        return None
    other = [r for r in runs if not is_budget_recipe(r.recipe)]
    name = lambda r: f"{r.path} (recipe {r.recipe.get('name', '?')})"  # noqa: E731
    return (
        f"{len(budget)} budget-recipe runs (e.g. {name(budget[0])}) and {len(other)} runs of other recipes "
        f"(e.g. {name(other[0])}) in one table: their references differ (FFCV's numbers vs the paper's); "
        "pass the run dirs of each kind separately (budget runs with --view budget)"
    )
