"""Validation top-1 error against epoch, one line per activation (mean over seeds, band = min..max).

python scripts/plot_curves.py runs/sweep [more dirs ...] --out figures/
  → figures/curves_<data>_<model>.png for every backbone found (complete runs only)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acon.tables import ACTIVATION_LABELS, TableError, _act_rank, collect  # noqa: E402


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
                curve[int(rec["epoch"])] = float(rec["val_top1_err"])
            except (json.JSONDecodeError, KeyError, ValueError) as e:
                raise TableError(f"{path}:{i}: bad record ({e})") from None
    return curve


def plot_backbone(
    curves: dict[str, list[dict[int, float]]], title: str, out: Path, log_y: bool = False
) -> Path:
    """One PNG: for each activation the mean curve over seeds and a min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for act in sorted(curves, key=_act_rank):
        runs = curves[act]
        epochs = sorted(set.intersection(*(set(c) for c in runs)))
        vals = [[c[e] for c in runs] for e in epochs]
        mean = [sum(v) / len(v) for v in vals]
        (line,) = ax.plot(
            epochs, mean, marker="o", ms=3, label=f"{ACTIVATION_LABELS.get(act, act)} (n={len(runs)})"
        )
        if len(runs) > 1:
            ax.fill_between(
                epochs, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.2
            )
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
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
        groups: dict[tuple[str, str], dict[str, list]] = {}
        for r in runs:
            groups.setdefault((r.data, r.model), {}).setdefault(r.activation, []).append(read_curve(r.path))
    except (TableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.dirs[0])
    for (data, model), curves in sorted(groups.items()):
        title = f"{model} on {data}: validation error"
        print(plot_backbone(curves, title, out / f"curves_{data}_{model}.png", args.log_y))
    return 0


if __name__ == "__main__":
    sys.exit(main())
