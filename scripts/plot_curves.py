"""Each task's primary metric against epoch, one line per activation (mean over seeds, band = min..max).

python scripts/plot_curves.py runs/sweep [more dirs ...] --out figures/
  → figures/curves_<data>_<model>.png for every backbone found (complete runs only): validation top-1
    error for classification, mIoU for segmentation, box AP for detection (results.json's primary_metric);
    the whole run on the left, the converged last half of the epochs with its own y-range on the right

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

METRIC_AXIS = {
    "top1_err": "validation top-1 error (%)",
    "mIoU": "validation mIoU (%)",
    "AP": "validation box AP (%)",
}
"""The y-axis label of each task's primary metric (results.json's ``primary_metric``)."""


def metric_axis(metric: str) -> str:
    """The y-axis label for ``metric``."""
    return METRIC_AXIS.get(metric, f"validation {metric}")


def read_curve(run_dir: Path, metric: str = "top1_err") -> dict[float, float]:
    """{epoch: validation ``metric``} from a run's metrics.jsonl (``val_<metric>`` of each validation: at
    epoch ends, and at fractional epochs for ``trainer.val_every_steps`` points and a ``max_steps`` stop)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise TableError(f"{path} does not exist (needed for the curves)")
    key, curve = f"val_{metric}", {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rec = json.loads(line)
                if key in rec or "epoch" not in rec:  # trainer.val_every_epochs skips some
                    curve[float(rec["epoch"])] = float(rec[key])
            except (json.JSONDecodeError, KeyError, ValueError) as e:
                raise TableError(f"{path}:{i}: bad record ({e})") from None
    if not curve:
        raise TableError(f"{path} has no {key} record: nothing to plot for primary metric {metric}")
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


ZOOM_MIN_EPOCHS = 4  # fewer validated epochs: one panel (nothing to zoom into)


def converged_limits(lines: list[tuple[str, list[dict[float, float]]]]) -> tuple[float, float, float]:
    """(first epoch, y low, y high) of the converged part: the last half of the validated epochs, every
    line's seeds included, with a 10 % margin."""
    epochs = sorted(set().union(*(c for _, curves in lines for c in curves)))
    first = epochs[len(epochs) // 2]
    vals = [v for _, curves in lines for c in curves for e, v in c.items() if e >= first]
    lo, hi = min(vals), max(vals)
    pad = max(0.1 * (hi - lo), 0.05 * max(abs(hi), 1e-3) if hi == lo else 0.0)
    return first, lo - pad, hi + pad


CYCLE = 10  # matplotlib's default colour cycle C0..C9


def _draw(ax, lines, first_epoch: float | None = None) -> bool:
    """The mean line and min..max band of every line on ``ax`` (from ``first_epoch``); True if banded."""
    banded = False
    for i, (label, curves) in enumerate(lines):
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        if first_epoch is not None:
            epochs = [e for e in epochs if e >= first_epoch]
        vals = [[c[e] for c in curves] for e in epochs]
        mean = [sum(v) / len(v) for v in vals]
        style = "-" if i < CYCLE else "--"  # past the 10 colours of the cycle: the same colours, dashed
        (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=label, color=f"C{i % CYCLE}", linestyle=style)
        if len(curves) > 1:
            lo, hi = [min(v) for v in vals], [max(v) for v in vals]
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2)
            banded = True
    return banded


def draw_curves(
    lines: list[tuple[str, list[dict[float, float]]]],
    title: str,
    log_y: bool = False,
    metric: str = "top1_err",
):
    """A matplotlib figure: per line the mean curve over seeds and a shaded min..max band; the whole run on
    the left, the converged last half of the epochs (y-range fitted to it) on the right, the legend below
    both panels where it cannot cover a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    points = set().union(*(c for _, curves in lines for c in curves))
    zoom = len(points) >= ZOOM_MIN_EPOCHS
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(10.5 if zoom else 6.4, 4.2), squeeze=False)
    axes = list(axes[0])
    banded = _draw(axes[0], lines)
    axes[0].set_title("whole run")
    if zoom:
        first, lo, hi = converged_limits(lines)
        _draw(axes[1], lines, first)
        axes[1].set_ylim(lo, hi)
        axes[1].set_title(f"converged part (epoch {first:g} on, y-range fitted)")
    for ax in axes:  # fractional epochs: val_every_steps points
        ax.xaxis.set_major_locator(MaxNLocator(integer=all(float(e).is_integer() for e in points)))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if log_y:
        axes[0].set_yscale("log")
    for ax in axes:
        ax.set_ylabel(metric_axis(metric))
    fig.suptitle(title)
    handles, _ = axes[0].get_legend_handles_labels()
    if banded:
        handles.append(Patch(color="grey", alpha=0.3, label=BAND_NOTE))
    fig.tight_layout()
    legend = axes[0].legend(  # below both panels, centred on the figure: it never covers a curve
        handles=handles,
        title="mean over seeds",
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        bbox_transform=fig.transFigure,
        ncol=min(len(handles), 4 if zoom else 2),
        frameon=False,
    )
    legend.set_in_layout(False)  # savefig(bbox_inches="tight") takes it in
    return fig


def plot_backbone(
    lines: list[tuple[str, list[dict[int, float]]]],
    title: str,
    out: Path,
    log_y: bool = False,
    metric: str = "top1_err",
) -> Path:
    """One PNG of :func:`draw_curves` at ``out`` (the legend below the panels included)."""
    import matplotlib.pyplot as plt

    fig = draw_curves(lines, title, log_y, metric)
    out.parent.mkdir(parents=True, exist_ok=True)
    legend = fig.axes[0].get_legend()
    fig.savefig(out, dpi=120, bbox_inches="tight", bbox_extra_artists=[*fig.axes, fig._suptitle, legend])
    plt.close(fig)
    return out


def figure_metric(key: tuple[str, str], cells: dict[str, list[list[Run]]]) -> str:
    """The one primary metric of a figure's runs (top1_err, mIoU, AP); runs of several metrics refuse."""
    found = {r.metric for groups in cells.values() for g in groups for r in g}
    if len(found) != 1:
        raise TableError(
            f"{key[1]} on {key[0]}: runs with different primary metrics ({', '.join(sorted(found))}) "
            f"cannot share one figure; plot them from separate folders"
        )
    return found.pop()


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
        metrics = {key: figure_metric(key, cells) for key, cells in figures.items()}
        plots = {
            key: [
                (label, [read_curve(r.path, metrics[key]) for r in group])
                for label, group in backbone_lines(cells)
            ]
            for key, cells in figures.items()
        }
    except (TableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.dirs[0])
    for (data, model), lines in sorted(plots.items()):
        metric = metrics[(data, model)]
        title = f"{model} on {data}: {metric_axis(metric).removesuffix(' (%)')}"
        path = plot_backbone(lines, title, out / f"curves_{data}_{model}.png", args.log_y, metric)
        print(f"wrote {path}: " + "; ".join(label for label, _ in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
