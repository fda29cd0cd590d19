"""The comparison-table flow on real runs: sweep → results.json → make_table (Markdown, CSV, LaTeX, HParams)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import sys

import pytest
from conftest import ROOT, compose, tiny_overrides

from acon.tables import TableError, build_cells, collect

sys.path.insert(0, str(ROOT / "scripts"))

ACTS = ("relu", "meta_acon")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def proxy_sweep(tiny_imagenet, tmp_path_factory):
    """The proxy sweep shrunk: 2 activations x 2 seeds, 1 epoch on the tiny folder, in one sweep dir."""
    from acon.trainer import train

    sweep = tmp_path_factory.mktemp("proxy") / "sweep"
    for act in ACTS:
        for seed in SEEDS:
            cfg = compose(
                tiny_overrides(tiny_imagenet, sweep)
                + ["experiment=proxy_digits", f"activation={act}", f"seed={seed}", "data.img_size=16"]
                + ["data.val_transform.resize=16"]
            )
            assert train(cfg)["status"] == "complete"
    return sweep


def _results(sweep):
    return [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]


def _copy_run(src, dst, **changes):
    shutil.copytree(src, dst)
    res = json.loads((dst / "results.json").read_text())
    for k, v in changes.items():
        if k == "lr":
            res["identity"]["recipe"]["lr"] = v
        else:
            res[k] = v
    (dst / "results.json").write_text(json.dumps(res))
    return dst


def test_table_cells_match_the_runs_results(proxy_sweep, tmp_path):
    import make_table

    out = tmp_path / "table"
    assert make_table.main([str(proxy_sweep), "--out", str(out)]) == 0
    rows = {r["activation"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert set(rows) == set(ACTS)
    results = _results(proxy_sweep)
    assert len(results) == len(ACTS) * len(SEEDS)
    means = {}
    for act in ACTS:
        errs = [r["top1_err"] for r in results if r["activation"] == act]
        means[act] = statistics.mean(errs)
        row = rows[act]
        assert int(row["n"]) == len(SEEDS) and row["seeds"] == "0 1"
        assert float(row["top1_err_mean"]) == pytest.approx(means[act], abs=1e-4)
        assert float(row["top1_err_std"]) == pytest.approx(statistics.stdev(errs), abs=1e-4)
        assert row["data"] == "folder" and row["model"] == "shufflenetv2_x0_5_small"
        assert row["paper_top1_err"] == "" and row["delta_paper"] == ""  # not ImageNet: no paper value
    assert float(rows["meta_acon"]["delta_relu"]) == pytest.approx(
        means["meta_acon"] - means["relu"], abs=1e-4
    )
    md = (out / "table.md").read_text()
    assert "| ReLU | Meta-ACON |" in md and f"{means['relu']:.2f} ± " in md and "(n=2)" in md
    assert "Incomplete" not in md
    tex = (out / "table.tex").read_text()
    assert tex.startswith(r"\begin{tabular}") and r"\pm" in tex and tex.rstrip().endswith(r"\end{tabular}")


def test_hparams_entries_are_written_per_run(proxy_sweep, tmp_path):
    import make_table
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "table"
    assert make_table.main([str(proxy_sweep), "--out", str(out)]) == 0
    sessions = sorted(p for p in (out / "hparams").iterdir() if p.is_dir())
    assert [p.name for p in sessions] == sorted(p.parent.name for p in proxy_sweep.rglob("results.json"))
    for session in sessions:
        ea = EventAccumulator(str(session))
        ea.Reload()
        assert "_hparams_/session_start_info" in ea.PluginTagToContent("hparams")
        res = json.loads(next(proxy_sweep.rglob(f"{session.name}/results.json")).read_text())
        (event,) = ea.Scalars("hparam/top1_err")
        assert event.value == pytest.approx(res["top1_err"], rel=1e-6)


def test_crashed_run_is_listed_not_averaged(proxy_sweep, tmp_path):
    import make_table

    root = tmp_path / "runs"
    shutil.copytree(proxy_sweep, root)
    crashed = root / "folder-shufflenetv2_x0_5_small-relu-s7"
    shutil.copytree(root / "folder-shufflenetv2_x0_5_small-relu-s0", crashed)
    (crashed / "results.json").unlink()  # killed before the end: config.yaml, last.pt, metrics stay
    failed = _copy_run(root / "folder-shufflenetv2_x0_5_small-relu-s1", root / "relu-s8", status="failed")
    failed_res = json.loads((failed / "results.json").read_text())
    failed_res["top1_err"] = 0.0
    (failed / "results.json").write_text(json.dumps(failed_res))
    out = tmp_path / "table"
    assert make_table.main([str(root), "--out", str(out)]) == 0
    rows = {r["activation"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert rows["relu"]["n"] == "2" and rows["relu"]["seeds"] == "0 1"
    md = (out / "table.md").read_text()
    assert "Incomplete or crashed runs (not averaged)" in md
    assert f"`{crashed}` (shufflenetv2_x0_5_small, relu, seed 0): no results.json" in md
    assert f"`{failed}`" in md and "status='failed'" in md
    last = json.loads((crashed / "metrics.jsonl").read_text().splitlines()[-1])
    assert (
        f"no results.json; last record at epoch {last['epoch']} (step {last['step']})" in md
    )  # whole epochs


def test_a_run_stopped_mid_epoch_gives_its_position_rounded(tmp_path):
    from acon.tables import collect

    run = tmp_path / "digits-shufflenetv2_x0_5_small-relu-s0"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"status": "stopped at max_steps"}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1.3636, "step": 30, "stopped_at_max_steps": True})
    )
    _, incomplete = collect([tmp_path])
    assert incomplete[0].reason == "status='stopped at max_steps'; last record at epoch 1.36 (step 30)"


def test_mixed_recipes_in_one_cell_is_an_error(proxy_sweep, tmp_path, capsys):
    import make_table

    root = tmp_path / "runs"
    shutil.copytree(proxy_sweep, root)
    _copy_run(root / "folder-shufflenetv2_x0_5_small-meta_acon-s1", root / "meta-s5", seed=5, lr=0.4)
    assert make_table.main([str(root), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "mixes 2 different recipes" in err and "meta-s5" in err
    assert not (tmp_path / "t" / "table.md").exists()


def test_same_seed_twice_is_an_error(proxy_sweep, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(proxy_sweep, root)
    _copy_run(root / "folder-shufflenetv2_x0_5_small-relu-s0", root / "again")
    with pytest.raises(TableError, match=r"seed\(s\) \[0\] more than once"):
        build_cells(collect([root])[0])


def _fake_run(folder, model, act, seed, err, recipe="resnet"):
    folder.mkdir(parents=True)
    res = {"status": "complete", "data": "imagenet", "model": model, "activation": act, "seed": seed}
    res |= {"top1_err": err, "top5_err": err / 3, "identity": {"recipe": {"name": recipe, "lr": 0.1}}}
    (folder / "results.json").write_text(json.dumps(res))


def test_imagenet_cells_get_paper_values_and_deltas(tmp_path):
    from acon.table_render import to_latex, to_markdown

    for seed, (relu, meta) in enumerate([(23.8, 21.9), (24.2, 22.3)]):
        _fake_run(tmp_path / f"r50-relu-{seed}", "resnet50", "relu", seed, relu)
        _fake_run(tmp_path / f"r50-meta-{seed}", "resnet50", "meta_acon", seed, meta)
    _fake_run(tmp_path / "r18-relu-0", "resnet18", "relu", 0, 30.0)
    cells = {(c.model, c.activation): c for c in build_cells(collect([tmp_path])[0])}
    meta = cells[("resnet50", "meta_acon")]
    assert meta.paper == 22.0 and meta.mean == pytest.approx(22.1)
    assert meta.delta_paper == pytest.approx(0.1) and meta.delta_relu == pytest.approx(-1.9)
    assert meta.std == pytest.approx(statistics.stdev([21.9, 22.3]))
    assert cells[("resnet18", "relu")].paper is None  # unpublished: never invented
    md = to_markdown(list(cells.values()))
    assert "| | paper | 24.0 | 22.0 |" in md and "| | Δ vs paper | +0.00 | +0.10 |" in md
    assert "| resnet18 | top-1 err % | 30.00 (n=1) |  |" in md and "± 0.00" not in md
    assert "24.0 & 22.0" in to_latex(list(cells.values()))


def test_curves_and_beta_figures_from_the_sweep(proxy_sweep, tmp_path, capsys):
    import plot_beta
    import plot_curves

    out = tmp_path / "fig"
    assert plot_curves.main([str(proxy_sweep), "--out", str(out)]) == 0
    assert (out / "curves_folder_shufflenetv2_x0_5_small.png").stat().st_size > 10_000
    meta = proxy_sweep / "folder-shufflenetv2_x0_5_small-meta_acon-s0" / "last.pt"
    assert plot_beta.main([str(meta), "--out", str(out), "--images", "5"]) == 0
    assert (out / "beta_last_site.png").stat().st_size > 10_000 and (out / "beta_layers.png").is_file()
    rows = list(csv.DictReader((out / "beta_layers.csv").open()))
    assert len(rows) == 37 and rows[-1]["name"] == "conv_last.2"  # every activation of ShuffleNetV2
    assert float(rows[-1]["beta_std_across_images"]) > 0  # Meta-ACON: each image gets its own beta
    relu = proxy_sweep / "folder-shufflenetv2_x0_5_small-relu-s0" / "last.pt"
    assert plot_beta.main([str(relu), "--out", str(out)]) == 2
    assert "has no ACON-C / Meta-ACON layer" in capsys.readouterr().err


def test_acon_c_beta_is_shared_by_all_images_and_resnet_site_is_last_bottleneck():
    import plot_beta
    import torch

    import models

    torch.manual_seed(0)
    net = models.create_model("resnet50", activation="acon_c", num_classes=3, small_input=True).eval()
    assert plot_beta.acon_layers(net)[-1][0] == "layer4.2.acon"
    betas = plot_beta.layer_betas(net, torch.randn(3, 3, 32, 32))
    last = betas["layer4.2.acon"]
    assert last.shape == (3, 512) and torch.equal(last[0], last[2])
