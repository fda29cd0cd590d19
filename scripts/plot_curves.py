"""Validation top-1 error against epoch, one line per activation (mean over seeds, band = min..max).

python scripts/plot_curves.py runs/sweep [more dirs ...] --out figures/
  → figures/curves_<data>_<model>.png for every backbone found (complete runs only)

Runs are grouped as make_table.py groups them: only runs of the same recipe share a line; where one
backbone's runs have several recipes, each gets its own line, labelled with the recipe keys that differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acon.recipes import describe, differing_keys, group_by_cell  # noqa: E402
from acon.tables import ACTIVATION_LABELS, Run, TableError, _act_rank, collect  # noqa: E402


def read_curve(run_dir: Path) -> dict[int, float]:
    """{epoch: val top-1 error} from a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise TableError(f"{path} does not exist (needed for the curves)")
    curve = {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rec = json.loads(line)
                if "val_top1_err" in rec or "epoch" not in rec:  # trainer.val_every_epochs skips some
                    curve[int(rec["epoch"])] = float(rec["val_top1_err"])
            except (json.JSONDecodeError, KeyError, ValueError) as e:
                raise TableError(f"{path}:{i}: bad record ({e})") from None
    return curve


BAND_NOTE = "shaded: min..max over seeds"


def backbone_lines(cells: dict[str, list[list[Run]]]) -> list[tuple[str, list[Run]]]:
    """(legend label, runs) per line of one backbone's figure: one line per activation and recipe.

    Runs are grouped as ``make_table.py`` groups them (``acon.recipes.group_by_cell``); where one figure
    holds several recipes, each label names its values of the recipe keys that differ.
    """
    groups = [g for act in sorted(cells, key=_act_rank) for g in cells[act]]
    keys = differing_keys([g[0].recipe for g in groups])
    lines = []
    for g in groups:
        label = ACTIVATION_LABELS.get(g[0].activation, g[0].activation)
        if keys:
            label += f", {describe(g[0].recipe, keys)}"
        lines.append((f"{label} (n={len(g)})", g))
    return lines


def draw_curves(lines: list[tuple[str, list[dict[int, float]]]], title: str, log_y: bool = False):
    """A matplotlib figure: per line the mean curve over seeds and a shaded min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    banded = False
    for label, curves in lines:
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        vals = [[c[e] for c in curves] for e in epochs]
        mean = [sum(v) / len(v) for v in vals]
        (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=label)
        if len(curves) > 1:
            lo, hi = [min(v) for v in vals], [max(v) for v in vals]
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2)
            banded = True
    if log_y:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if banded:
        handles.append(Patch(color="grey", alpha=0.3, label=BAND_NOTE))
    ax.legend(handles=handles, title="mean over seeds")
    fig.tight_layout()
    return fig


def plot_backbone(
    lines: list[tuple[str, list[dict[int, float]]]], title: str, out: Path, log_y: bool = False
) -> Path:
    """One PNG of :func:`draw_curves` at ``out``."""
    import matplotlib.pyplot as plt

    fig = draw_curves(lines, title, log_y)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Write one curve figure per (data, model) found under the given dirs."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="run dirs or sweep dirs (searched recursively)")
    ap.add_argument("--out", default=None, help="output folder (default: the first dir given)")
    ap.add_argument("--log-y", action="store_true", help="logarithmic error axis")
    args = ap.parse_args(argv)
    try:
        runs, _ = collect(args.dirs)
        if not runs:
            raise TableError(f"no complete runs under {args.dirs}")
        figures: dict[tuple[str, str], dict[str, list[list[Run]]]] = {}
        for (data, model, act), by_recipe in group_by_cell(runs).items():
            figures.setdefault((data, model), {})[act] = by_recipe
        plots = {
            key: [(label, [read_curve(r.path) for r in group]) for label, group in backbone_lines(cells)]
            for key, cells in figures.items()
        }
    except (TableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.dirs[0])
    for (data, model), lines in sorted(plots.items()):
        title = f"{model} on {data}: validation error"
        path = plot_backbone(lines, title, out / f"curves_{data}_{model}.png", args.log_y)
        print(f"wrote {path}: " + "; ".join(label for label, _ in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
