"""Comparison table (Markdown, CSV, LaTeX) and TensorBoard HParams entries from run or sweep dirs.

python scripts/make_table.py runs/sweep [more run or sweep dirs ...] --out tables/
  → tables/table.md, table.csv, table.tex, and tables/hparams/<run>/ (tensorboard --logdir tables/hparams)
python scripts/make_table.py runs/... --view tfnet   → also tables/table_tfnet.md (the TFNet table's form)
python scripts/make_table.py runs/... --view se      → also tables/table_se.md (SE vs Meta-ACON over ReLU)
python scripts/make_table.py runs/... --view budget  → also tables/table_budget.md (budget recipes vs FFCV)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acon.budget_table import budget_markdown, load_reference_results  # noqa: E402
from acon.table_hparams import write_hparams  # noqa: E402
from acon.table_render import to_csv, to_latex, to_markdown  # noqa: E402
from acon.table_views import se_markdown, tfnet_markdown  # noqa: E402
from acon.tables import PAPER_CSV, TableError, build_cells, collect, load_paper_results  # noqa: E402

VIEWS = ("activations", "tfnet", "se", "budget")


def main(argv: list[str] | None = None) -> int:
    """Collect results.json files, print the Markdown table and write all outputs; 2 on bad input."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="run dirs or sweep dirs (searched recursively)")
    ap.add_argument("--out", default=None, help="output folder (default: the first dir given)")
    ap.add_argument("--paper", default=str(PAPER_CSV), help="CSV of published top-1 errors")
    ap.add_argument("--no-hparams", action="store_true", help="skip the TensorBoard HParams entries")
    ap.add_argument("--quiet", action="store_true", help="write the files without printing the tables")
    ap.add_argument(
        "--view",
        choices=VIEWS,
        default="activations",
        help="activations: the per-activation table (always written); tfnet: also the TFNet table "
        "(table_tfnet.md); se: also SE vs Meta-ACON relative gains over ReLU (table_se.md); budget: also "
        "budget-recipe runs vs FFCV's published numbers (table_budget.md)",
    )
    args = ap.parse_args(argv)
    try:
        runs, incomplete = collect(args.dirs)
        if not runs and not incomplete:
            raise TableError(f"no run dirs (results.json, config.yaml or last.pt) under {args.dirs}")
        cells = build_cells(runs, load_paper_results(args.paper))
        view = {
            "tfnet": lambda: tfnet_markdown(cells, runs),
            "se": lambda: se_markdown(cells),
            "budget": lambda: budget_markdown(cells, runs, load_reference_results(args.paper)),
        }.get(args.view)
        view_md = view() if view else None
    except (TableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(cells, incomplete)
    (out / "table.md").write_text(md)
    (out / "table.csv").write_text(to_csv(cells))
    (out / "table.tex").write_text(to_latex(cells))
    if not args.quiet:
        print(md)
    if view_md is not None:
        (out / f"table_{args.view}.md").write_text(view_md)
        if not args.quiet:
            print(view_md)
    if not args.no_hparams and runs:
        write_hparams(runs, out / "hparams")
    print(
        f"{len(runs)} complete runs in {len(cells)} cells, {len(incomplete)} incomplete; "
        f"wrote {out}/table.{{md,csv,tex}}"
        + ("" if view_md is None else f", {out}/table_{args.view}.md")
        + ("" if args.no_hparams else f" and {out}/hparams"),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
