"""plot_curves.py: each task's primary metric with its own label; legends beside, never over, the curves;
a converged-part panel whose y-range shows the last few-percent differences."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

TASKS = {  # primary metric: (data, model, the other metrics.jsonl keys, rising curve?)
    "top1_err": ("digits", "shufflenetv2_x0_5_small", {"val_top5_err": 1.0}, False),
    "mIoU": ("seg_shapes", "shufflenetv2_x0_5_small", {"val_pixel_acc": 90.0}, True),
    "AP": ("det_shapes", "shufflenetv2_x0_5", {"val_AP50": 60.0}, True),
}


def write_run(folder, metric: str, act: str, seed: int, epochs: int = 12, final: float = 50.0):
    """A finished run dir as the trainer writes it for a task: results.json + one metrics line per epoch."""
    data, model, others, rising = TASKS[metric]
    folder.mkdir(parents=True)
    sign = -1 if rising else 1
    curve = [final + sign * 40.0 / e + 0.3 * seed for e in range(1, epochs + 1)]
    res = {"status": "complete", "data": data, "model": model, "activation": act, "seed": seed}
    res |= {
        "primary_metric": metric,
        metric: curve[-1],
        "identity": {"recipe": {"name": "r", "epochs": epochs}},
    }
    (folder / "results.json").write_text(json.dumps(res))
    lines = [
        json.dumps({"epoch": e, "step": 10 * e, f"val_{metric}": v, **others}) for e, v in enumerate(curve, 1)
    ]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def sweep(root, metric: str):
    for act, final in (("relu", 50.0), ("acon_c", 48.5), ("meta_acon", 47.0)):
        for seed in (0, 1):
            write_run(root / f"{act}-s{seed}", metric, act, seed, final=final)
    return root


@pytest.mark.parametrize("metric, label", [("mIoU", "validation mIoU (%)"), ("AP", "validation box AP (%)")])
def test_transfer_runs_plot_their_own_metric(metric, label, tmp_path, capsys):
    import matplotlib.pyplot as plt
    import plot_curves

    from acon.tables import collect

    root = sweep(tmp_path / "runs", metric)
    out = tmp_path / "fig"
    assert plot_curves.main([str(root), "--out", str(out)]) == 0
    data, model, _, _ = TASKS[metric]
    png = out / f"curves_{data}_{model}.png"
    assert png.stat().st_size > 10_000 and "ACON-C (n=2)" in capsys.readouterr().out
    runs, _ = collect([root])
    curves = [plot_curves.read_curve(r.path, metric) for r in runs if r.activation == "relu"]
    assert len(curves) == 2 and all(len(c) == 12 for c in curves)
    fig = plot_curves.draw_curves([("ReLU (n=2)", curves)], "t", metric=metric)
    try:
        assert fig.axes[0].get_ylabel() == label
        assert all(len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines())
    finally:
        plt.close(fig)


def test_runs_without_the_metric_are_refused_with_a_line(tmp_path, capsys):
    import plot_curves

    root = tmp_path / "runs"
    write_run(root / "a", "mIoU", "relu", 0)
    (root / "a" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1_err": 3.0}) + "\n")
    assert plot_curves.main([str(root), "--out", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no val_mIoU record" in err
    assert not (tmp_path / "fig").exists()


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legend_covers_no_panel_and_the_zoom_fits_the_converged_part(tmp_path):
    import matplotlib.pyplot as plt
    import plot_curves

    from acon.tables import collect

    runs, _ = collect([sweep(tmp_path / "runs", "top1_err")])
    lines = [
        (act, [plot_curves.read_curve(r.path) for r in runs if r.activation == act])
        for act in ("relu", "acon_c")
    ]
    fig = plot_curves.draw_curves(lines, "t")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend = fig.axes[0].get_legend().get_window_extent(renderer)
        assert len(fig.axes) == 2
        assert not any(_overlaps(legend, ax.get_window_extent(renderer)) for ax in fig.axes)
        whole, zoom = (ax.get_ylim() for ax in fig.axes)
        late = [v for _, curves in lines for c in curves for e, v in c.items() if e >= 7]
        assert zoom[0] <= min(late) and zoom[1] >= max(late)
        assert (zoom[1] - zoom[0]) < 0.25 * (whole[1] - whole[0])  # the final differences are visible
    finally:
        plt.close(fig)
    png = plot_curves.plot_backbone(lines, "t", tmp_path / "c.png")
    height = plt.imread(png).shape[0]
    assert height > 4.2 * 120 + 40, height  # the legend below the panels is in the file


def test_beta_layers_panels_are_lines_with_bands_and_an_outside_legend(tmp_path):
    """beta_layers.png: two checkpoints' p1/p2 as mean lines with ±std bands (no error bars piled on one
    another); the legend below the three panels."""
    from pathlib import Path

    import matplotlib.pyplot as plt
    import plot_beta

    def rows(offset):
        keys = ("p1", "p2", "beta")
        return [
            {"layer": i, **{f"{k}_{s}": offset + 0.01 * i for k in keys for s in ("mean", "std")}}
            for i in range(20)
        ]

    results = [
        {"path": Path(f"runs/{a}-s0/last.pt"), "activation": a, "rows": rows(o)}
        for a, o in (("acon_c", 0.0), ("meta_acon", 0.5))
    ]
    fig = plot_beta.plot_layers(results)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert len(fig.axes) == 3 and not any(ax.containers for ax in fig.axes)  # no errorbar containers
        assert all(len(ax.get_lines()) >= 2 and ax.collections for ax in fig.axes)
        legend = fig.axes[0].get_legend().get_window_extent(renderer)
        assert not any(_overlaps(legend, ax.get_window_extent(renderer)) for ax in fig.axes)
        texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert texts == ["ACON-C (acon_c-s0)", "Meta-ACON (meta_acon-s0)"]
    finally:
        plt.close(fig)


def test_val_every_steps_points_are_kept_apart(tmp_path):
    """An iteration recipe validated every quarter epoch (metrics.jsonl epochs 0.25, 0.5, …) and a
    max_steps stop: every point is its own x (before: int(epoch) kept one point per whole epoch)."""
    import matplotlib.pyplot as plt
    import plot_curves

    run = tmp_path / "r"
    run.mkdir()
    epochs = [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.1]
    records = [{"epoch": e, "step": int(40 * e), "val_top1_err": 90.0 - 10 * e} for e in epochs]
    records[-1]["stopped_at_max_steps"] = True
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = plot_curves.read_curve(run)
    assert curve == {e: 90.0 - 10 * e for e in epochs}
    fig = plot_curves.draw_curves([("ReLU (n=1)", [curve])], "t")
    xs = list(fig.axes[0].lines[0].get_xdata())
    plt.close(fig)
    assert xs == epochs
