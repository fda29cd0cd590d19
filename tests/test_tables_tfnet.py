"""The TFNet table and SE views from real CPU proxy runs on digits (a few steps each)."""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import ROOT, compose

from acon.table_views import se_markdown, tfnet_tiers
from acon.tables import TableError, build_cells, collect

sys.path.insert(0, str(ROOT / "scripts"))

SHORT = ["recipe.iterations=2", "recipe.epochs=null", "recipe.warmup_steps=0", "trainer.eval_batch_size=512"]
SNET = ["model=shufflenetv2_x0_5_small"]
SE = SNET + ["+model.kwargs.se=true", "model.name=shufflenetv2_x0_5_small_se"]


def _train(sweep, overrides):
    from acon.trainer import train

    cfg = compose(["experiment=proxy_tfnet_digits", f"out_dir={sweep}", *SHORT, *overrides])
    assert train(cfg)["status"] == "complete"


@pytest.fixture(scope="module")
def digits_sweep(tmp_path_factory):
    """TFNet 0.5 (ACON-FReLU) and ShuffleNetV2 0.5x with ReLU: 2 steps each."""
    sweep = tmp_path_factory.mktemp("proxy_tfnet") / "sweep"
    for overrides in ([], [*SNET, "activation=relu"]):
        _train(sweep, overrides)
    return sweep


@pytest.fixture(scope="module")
def se_sweep(digits_sweep):
    """``digits_sweep`` plus ShuffleNetV2 0.5x with ReLU + SE and with Meta-ACON."""
    for overrides in ([*SE, "activation=relu"], [*SNET, "activation=meta_acon"]):
        _train(digits_sweep, overrides)
    return digits_sweep


def _results(sweep) -> dict[tuple[str, str], dict]:
    out = {}
    for p in sweep.rglob("results.json"):
        r = json.loads(p.read_text())
        out[(r["model"], r["activation"])] = r
    return out


def test_tfnet_view_from_digits_runs(digits_sweep, tmp_path):
    import make_table

    out = tmp_path / "t"
    assert make_table.main([str(digits_sweep), "--view", "tfnet", "--out", str(out), "--no-hparams"]) == 0
    md = (out / "table_tfnet.md").read_text()
    res = _results(digits_sweep)
    tf, relu = res[("tfnet_x0_5_small", "acon_frelu")], res[("shufflenetv2_x0_5_small", "relu")]
    row = next(line for line in md.splitlines() if "| tfnet_x0_5_small | acon_frelu |" in line)
    # the candidate's gain is over the best baseline of its tier (the lowest error among them)
    tier = [r for (m, a), r in res.items() if (m, a) != ("tfnet_x0_5_small", "acon_frelu")]
    best = min(r["top1_err"] for r in tier)
    named = re.search(r"([+-]\d+\.\d\d) \(vs (\S+)\)", row)
    assert named and float(named[1]) == pytest.approx(best - tf["top1_err"], abs=0.006)
    assert any(r["model"] == named[2] and r["top1_err"] == best for r in tier)
    assert f"{tf['top1_err']:.2f} (n=1)" in row and "±" not in row and f"{tf['params'] / 1e3:.1f}K" in row
    assert re.search(
        rf"\| shufflenetv2_x0_5_small \| relu \| [\d.]+[KM] \| [\d.]+[KM] \| {relu['top1_err']:.2f}", md
    )
    assert md.index("shufflenetv2_x0_5_small | relu") < md.index("tfnet_x0_5_small | acon_frelu")


@pytest.mark.slow
def test_se_view_from_digits_runs(se_sweep):
    runs, _ = collect([se_sweep])
    md = se_markdown(build_cells(runs, {}))
    res = _results(se_sweep)
    acc = {k: 100 - r["top1_err"] for k, r in res.items()}
    base = acc[("shufflenetv2_x0_5_small", "relu")]
    gain_se = 100 * (acc[("shufflenetv2_x0_5_small_se", "relu")] - base) / base
    gain_meta = 100 * (acc[("shufflenetv2_x0_5_small", "meta_acon")] - base) / base
    row = next(line for line in md.splitlines() if "| shufflenetv2_x0_5_small |" in line)
    assert f"{gain_se:+.2f}%" in row and f"{gain_meta:+.2f}%" in row
    assert "tfnet" not in md  # no ReLU baseline for TFNet in this sweep


def test_views_refuse_sweeps_without_their_cells(digits_sweep):
    runs, _ = collect([digits_sweep])
    cells = [
        c for c in build_cells(runs, {}) if (c.model, c.activation) == ("shufflenetv2_x0_5_small", "relu")
    ]
    with pytest.raises(TableError, match="TFNet view needs"):
        tfnet_tiers(cells, runs)
    with pytest.raises(TableError, match="SE view needs"):
        se_markdown(cells)  # a ReLU run but neither its SE nor its Meta-ACON counterpart


def test_imagenet_tiers_follow_the_readme_layout():
    """On ImageNet the tiers are the README's rows: each baseline joins the TFNet nearest in FLOPs."""
    from acon.tables import Cell, Run

    flops = {"mobilenetv2_x0_17": 42, "shufflenetv2_x0_5": 41, "tfnet_x0_5": 43, "mobilenetv2_x0_6": 141}
    flops |= {"shufflenetv2_x1_0": 146, "tfnet_x1_0": 135, "mobilenetv2_x1_4": 585, "shufflenetv2_x2_0": 591}
    flops |= {"tfnet_x2_0": 474}
    act = {m: "acon_frelu" if m.startswith("tfnet") else "relu" for m in flops}
    cells = [Cell("imagenet", m, act[m], [30.0], [0], []) for m in flops]
    runs = [
        Run(None, "imagenet", m, act[m], 0, 30.0, 10.0, {}, {"flops": f, "params": 1})
        for m, f in flops.items()
    ]
    tiers = {c.model: sorted(b.model for b in bs) for c, bs in tfnet_tiers(cells, runs)}
    assert tiers == {
        "tfnet_x0_5": ["mobilenetv2_x0_17", "shufflenetv2_x0_5"],
        "tfnet_x1_0": ["mobilenetv2_x0_6", "shufflenetv2_x1_0"],
        "tfnet_x2_0": ["mobilenetv2_x1_4", "shufflenetv2_x2_0"],
    }
