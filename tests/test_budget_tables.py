"""make_table.py --view budget: budget-recipe runs beside FFCV's published numbers (rows of
acon/paper_results.csv naming a recipe), never in one table with runs of the paper's recipes."""

from __future__ import annotations

import json
import sys

from conftest import ROOT

from acon.budget_table import load_reference_results
from acon.tables import load_paper_results

sys.path.insert(0, str(ROOT / "scripts"))

BUDGET_16 = {"name": "budget_16", "epochs": 16, "lr": 0.5, "resolution": {"min_res": 160, "max_res": 192}}
PAPER = {"name": "resnet", "iterations": 600000, "lr": 0.1, "resolution": None}


def _run(folder, model, act, seed, err, recipe, data="imagenet"):
    """A finished run dir as the trainer writes it (results.json with the recipe identity)."""
    folder.mkdir(parents=True)
    res = {"status": "complete", "data": data, "model": model, "activation": act, "seed": seed}
    res |= {"top1_err": err, "top5_err": 9.0, "identity": {"recipe": recipe}, "recipe": recipe["name"]}
    (folder / "results.json").write_text(json.dumps(res))


def test_ffcv_references_are_separate_from_the_papers_numbers():
    refs = load_reference_results()
    assert refs[("resnet50", "relu", "budget_16")][0] == 26.2  # 73.8 % top-1
    assert refs[("resnet18", "relu", "budget_88")][0] == 27.6  # 72.4 %
    assert "rn50_configs/rn50_88_epochs.yaml" in refs[("resnet50", "relu", "budget_88")][1]
    assert len(refs) == 6 and load_paper_results()[("resnet50", "relu")] == 24.0  # the paper's, untouched


def test_budget_view_shows_delta_vs_ffcv_and_vs_relu(tmp_path, capsys):
    import make_table

    root = tmp_path / "runs"
    for seed, (relu, acon) in enumerate([(27.0, 26.0), (27.4, 26.2)]):
        _run(root / f"r50-relu-{seed}", "resnet50", "relu", seed, relu, BUDGET_16)
        _run(root / f"r50-acon-{seed}", "resnet50", "acon_c", seed, acon, BUDGET_16)
    _run(root / "sub-relu", "resnet18", "relu", 0, 20.0, BUDGET_16, data="imagenet[imagenet100]")
    assert make_table.main([str(root), "--out", str(tmp_path / "t"), "--view", "budget", "--no-hparams"]) == 0
    md = (tmp_path / "t" / "table_budget.md").read_text()
    assert "| imagenet | resnet50 | budget_16 | relu | 27.20 ± 0.28 (n=2) | 26.2 [1] | +1.00 | — |" in md
    assert "| imagenet | resnet50 | budget_16 | acon_c | 26.10 ± 0.14 (n=2) | — | — | −1.10 |" in md
    assert "| imagenet[imagenet100] | resnet18 | budget_16 | relu | 20.00 (n=1) | — | — | — |" in md
    assert "[1] FFCV ffcv-imagenet README, rn50_configs/rn50_16_epochs.yaml: 73.8 % top-1" in md
    assert "a class subset" in md
    table = (tmp_path / "t" / "table.md").read_text()
    assert "| | paper |" not in table  # the paper's 120-epoch numbers are no reference for budget runs


def test_budget_and_paper_recipe_runs_never_share_a_table(tmp_path, capsys):
    import make_table

    root = tmp_path / "runs"
    _run(root / "budget", "resnet50", "relu", 0, 27.0, BUDGET_16)
    _run(root / "paper", "resnet18", "relu", 0, 30.0, PAPER)  # another cell: only the kind differs
    for view in ("activations", "budget"):
        assert make_table.main([str(root), "--out", str(tmp_path / "t"), "--view", view]) == 2
        err = capsys.readouterr().err
        assert "1 budget-recipe runs" in err and f"{root / 'paper'} (recipe resnet)" in err
    _run(root / "budget-s1", "resnet18", "relu", 0, 30.0, BUDGET_16)  # same cell, two recipes: the old rule
    (root / "paper" / "results.json").unlink()
    _run(root / "b32", "resnet18", "relu", 1, 29.0, {**BUDGET_16, "name": "budget_32", "epochs": 32})
    assert make_table.main([str(root), "--out", str(tmp_path / "t"), "--view", "budget"]) == 2
    assert "mixes 2 different recipes" in capsys.readouterr().err


def test_budget_view_refuses_paper_recipe_runs(tmp_path, capsys):
    import make_table

    _run(tmp_path / "runs" / "paper", "resnet50", "relu", 0, 24.1, PAPER)
    assert make_table.main([str(tmp_path / "runs"), "--view", "budget", "--no-hparams"]) == 2
    assert "the budget view needs runs of budget recipes" in capsys.readouterr().err


def test_runs_from_before_the_new_null_recipe_keys_average_with_newer_ones(tmp_path):
    """A recipe written before ``resolution``/``warmup_epochs`` existed is the same recipe as one with them
    null: both seeds land in one cell."""
    from acon.tables import build_cells, collect

    old = {k: v for k, v in PAPER.items() if k != "resolution"}
    _run(tmp_path / "s0", "resnet50", "relu", 0, 24.2, old)
    _run(tmp_path / "s1", "resnet50", "relu", 1, 24.4, {**PAPER, "warmup_epochs": None})
    (cell,) = build_cells(collect([tmp_path])[0])
    assert cell.seeds == [0, 1] and cell.paper == 24.0
