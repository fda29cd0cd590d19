"""eval.py as the README uses it: a whole sweep, a validation-only data root, converted checkpoints; and
the converter's errors."""

from __future__ import annotations

import csv
import json
import shutil
import sys

import pytest
import torch
from conftest import compose, load_script, run_cli, tiny_overrides

import models
from acon.evaluation import run_eval

pytestmark = pytest.mark.usefixtures("one_thread")

RUNS = (("relu", 0), ("acon_c", 1))


@pytest.fixture(scope="module")
def sweep(tiny_imagenet, tmp_path_factory):
    """runs/<sweep_name>/<run_name>/{best,last}.pt: two finished 1-epoch runs, as `train.py -m` lays them."""
    from acon.trainer import train

    root = tmp_path_factory.mktemp("eval_sweep") / "mysweep"
    for act, seed in RUNS:
        ov = ["model=shufflenetv2_x0_5_small", f"activation={act}", f"seed={seed}", "data.img_size=16"]
        cfg = compose(tiny_overrides(tiny_imagenet, root) + ov + ["data.val_transform.resize=16"])
        assert train(cfg)["status"] == "complete"
    return root


@pytest.fixture(scope="module")
def val_only(tiny_imagenet, tmp_path_factory):
    """A data root holding only val/<class>/*.JPEG, as for checking released weights."""
    root = tmp_path_factory.mktemp("val_only")
    shutil.copytree(tiny_imagenet / "val", root / "val")
    return root


def test_eval_on_a_sweep_dir_with_only_a_validation_folder(sweep, val_only, tmp_path):
    proc = run_cli(
        [sys.executable, "eval.py", f"checkpoint={sweep}/", f"data.root={val_only}"],
        env={"ACON_EVAL_DIR": str(tmp_path / "eval")},
    )
    rows = list(csv.DictReader((sweep / "eval.csv").open()))
    assert f"wrote {sweep / 'eval.csv'}" in proc.stdout
    got = {(r["model"], r["activation"], r["seed"], r["checkpoint"].rsplit("/", 1)[-1]) for r in rows}
    model = "shufflenetv2_x0_5_small"
    assert got == {(model, a, str(s), f) for a, s in RUNS for f in ("best.pt", "last.pt")}
    for r in rows:
        run_dir = sweep / f"folder-{r['model']}-{r['activation']}-s{r['seed']}"
        assert r["checkpoint"].startswith(str(run_dir)) and r["count"] == "9"
        history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert float(r["top1_err"]) == pytest.approx(history[-1]["val_top1_err"], abs=1e-9)


def _script():
    return load_script("convert_official_checkpoint")


def _released(name: str, activation: str, path, num_classes: int = 1000):
    """An authors'-format file ({'state_dict': ...} with 'module.' keys) with random weights."""
    torch.manual_seed(0)
    model = models.create_model(name, activation, num_classes=num_classes)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def _eval(checkpoint, root, tmp_path, *extra):
    data = [f"data.root={root}", "data.num_classes=3", "data.num_workers=0", "data.img_size=32"]
    overrides = [f"checkpoint={checkpoint}", "data=folder", *data, "data.val_transform.resize=36", *extra]
    (row,) = run_eval(compose([*overrides, "trainer.device=cpu", f"out={tmp_path / 'e.json'}"], "eval"))
    return row


def test_converted_checkpoint_and_official_model_alone_evaluate(val_only, tmp_path):
    released = _released("shufflenetv2_x0_5", "acon_c", tmp_path / "ShuffleNetV2+ACON.pth.tar", 3)
    converted = tmp_path / "converted" / "acon_x0_5.pt"
    assert _script().main([str(released), str(converted), "--model", "shufflenetv2_x0_5"]) == 0
    full = _eval(
        released, val_only, tmp_path, "official.model=shufflenetv2_x0_5", "official.activation=acon_c"
    )
    own = _eval(converted, val_only, tmp_path)  # the file records model and activation
    alone = _eval(released, val_only, tmp_path, "official.model=shufflenetv2_x0_5")  # activation inferred
    for row in (own, alone):
        assert (row["model"], row["activation"], row["count"]) == ("shufflenetv2_x0_5", "acon_c", 9)
        assert row["loss"] == pytest.approx(full["loss"], rel=1e-6) and row["top1_err"] == full["top1_err"]
    with pytest.raises(Exception, match=r"official\.model=<one of"):
        _eval(released, val_only, tmp_path)


def test_convert_missing_file_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "ShuffleNetV2+ACON.pth.tar"
    assert _script().main([str(missing), str(tmp_path / "out.pt"), "--model", "shufflenetv2_x0_5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(missing) in err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(
    "weights,asked",
    [("resnet18", "resnet50"), ("shufflenetv2_x0_5", "shufflenetv2_x1_0")],
    ids=["keys", "shapes"],
)
def test_convert_names_the_architecture_the_keys_point_to(tmp_path, capsys, weights, asked):
    released = _released(weights, "acon_c", tmp_path / "released.pth.tar")
    assert _script().main([str(released), str(tmp_path / "out.pt"), "--model", asked]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {released}: ") and err.count("\n") == 1
    assert f"those of {weights} (activation 'acon_c'), not {asked}" in err and f"--model {weights}" in err
    assert "activation parameters differ" not in err
