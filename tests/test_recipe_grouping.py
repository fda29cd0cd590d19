"""make_table.py and plot_curves.py group runs by one rule (acon.recipes): runs of different recipes are
never averaged. Run dirs here are written as the trainer writes them (results.json + metrics.jsonl)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT

from acon.tables import collect

sys.path.insert(0, str(ROOT / "scripts"))

DIGITS = {"name": "digits", "lr": 0.1, "epochs": 14, "batch_size": 64, "warmup_steps": 66}


def _run(folder, act, seed, epochs, lr=0.1, base=10.0):
    """A finished run dir: results.json with the recipe identity, and one metrics line per epoch."""
    folder.mkdir(parents=True)
    recipe = {**DIGITS, "epochs": epochs, "lr": lr}
    curve = [base + 30.0 / e + seed for e in range(1, epochs + 1)]
    res = {"status": "complete", "data": "digits", "model": "shufflenetv2_x0_5_small", "activation": act}
    res |= {"seed": seed, "top1_err": curve[-1], "top5_err": 0.0, "identity": {"recipe": recipe}}
    (folder / "results.json").write_text(json.dumps(res))
    lines = [json.dumps({"epoch": e, "val_top1_err": v}) for e, v in enumerate(curve, 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def mixed_sweep(tmp_path):
    """ACON-C at 14 and at 4 epochs (2 seeds each) and ReLU at 14 epochs, in one sweep dir."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        _run(root / f"acon_c-e14-s{seed}", "acon_c", seed, 14)
        _run(root / f"acon_c-e4-s{seed}", "acon_c", seed, 4, base=40.0)
        _run(root / f"relu-e14-s{seed}", "relu", seed, 14)
    return root


def test_make_table_names_the_recipe_keys_that_differ(tmp_path, capsys):
    import make_table

    root = tmp_path / "runs"
    _run(root / "meta-s0", "meta_acon", 0, 8, lr=0.05)
    _run(root / "meta-s1", "meta_acon", 1, 6, lr=0.4)
    assert make_table.main([str(root), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "they differ in epochs, lr:" in err
    assert (
        f"{root / 'meta-s0'} (epochs=8, lr=0.05)" in err and f"{root / 'meta-s1'} (epochs=6, lr=0.4)" in err
    )
    assert "(recipe digits)" not in err


def test_curves_split_lines_by_recipe_like_the_table(mixed_sweep, tmp_path, capsys):
    import make_table
    import plot_curves

    assert make_table.main([str(mixed_sweep), "--out", str(tmp_path / "t")]) == 2
    assert "they differ in epochs" in capsys.readouterr().err
    out = tmp_path / "fig"
    assert plot_curves.main([str(mixed_sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ReLU, epochs=14 (n=2)" in printed and "ACON-C, epochs=14 (n=2)" in printed
    assert "ACON-C, epochs=4 (n=2)" in printed
    assert (out / "curves_digits_shufflenetv2_x0_5_small.png").stat().st_size > 10_000
    from acon.recipes import group_by_cell

    runs, _ = collect([mixed_sweep])
    by_act = {act: groups for (_, _, act), groups in group_by_cell(runs).items()}
    lines = dict(plot_curves.backbone_lines(by_act))
    short = lines["ACON-C, epochs=4 (n=2)"]
    assert sorted(r.path.name for r in short) == ["acon_c-e4-s0", "acon_c-e4-s1"]
    assert sorted(r.path.name for r in lines["ACON-C, epochs=14 (n=2)"]) == ["acon_c-e14-s0", "acon_c-e14-s1"]


def test_one_recipe_keeps_plain_labels(tmp_path, capsys):
    import plot_curves

    root = tmp_path / "runs"
    for seed in (0, 1):
        _run(root / f"relu-s{seed}", "relu", seed, 3)
        _run(root / f"acon-s{seed}", "acon_c", seed, 3)
    assert plot_curves.main([str(root), "--out", str(tmp_path / "fig")]) == 0
    printed = capsys.readouterr().out
    assert "ReLU (n=2)" in printed and "ACON-C (n=2)" in printed and "epochs=" not in printed


def test_curve_ticks_are_whole_epochs_and_the_band_is_named(tmp_path):
    import matplotlib.pyplot as plt
    import plot_curves

    root = tmp_path / "runs"
    for seed in (0, 1):
        _run(root / f"acon-s{seed}", "acon_c", seed, 4)
    runs, _ = collect([root])
    curves = [plot_curves.read_curve(r.path) for r in runs]
    fig = plot_curves.draw_curves([("ACON-C (n=2)", curves)], "t")
    try:
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "min..max" in " ".join(legend) and "seeds" in " ".join(legend)
    finally:
        plt.close(fig)
