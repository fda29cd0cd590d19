"""eval.py on a sweep folder builds its validation data once per call (dataset, loader workers, decoded
batches) and gives every checkpoint the metrics it gets when evaluated alone."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, tiny_overrides

import acon.data
from acon import distributed
from acon.evaluation import SharedEvalData, checkpoints_in, evaluate_checkpoint, run_eval

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sweep(tiny_imagenet, tmp_path_factory):
    """<sweep>/<run>/{best,last}.pt of two finished 1-epoch runs (ReLU, ACON-C), as `train.py -m` lays them."""
    from acon.trainer import train

    root = tmp_path_factory.mktemp("shared_eval") / "sweep"
    for act, seed in (("relu", 0), ("acon_c", 1)):
        ov = ["model=shufflenetv2_x0_5_small", f"activation={act}", f"seed={seed}", "data.img_size=16"]
        assert train(compose(tiny_overrides(tiny_imagenet, root) + ov + ["data.val_transform.resize=16"]))
    return root


@pytest.fixture
def counted(monkeypatch):
    """Counts validation datasets built and DataLoader iterations started (each starts its workers)."""
    counts = {"datasets": 0, "iterations": 0}
    build, iterate = acon.data.build_val_dataset, torch.utils.data.DataLoader.__iter__

    def build_counted(*a, **k):
        counts["datasets"] += 1
        return build(*a, **k)

    def iter_counted(self):
        counts["iterations"] += 1
        return iterate(self)

    monkeypatch.setattr(acon.data, "build_val_dataset", build_counted)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", iter_counted)
    return counts


def _eval(checkpoint, tmp_path, name: str) -> list[dict]:
    ov = [f"checkpoint={checkpoint}", "trainer.device=cpu", "data.num_workers=1", f"out={tmp_path / name}"]
    return run_eval(compose(ov, "eval"))


def _metrics(row: dict) -> tuple:
    top5 = row.get("top5_err")  # not reported below 6 classes
    return row["top1_err"], top5, row["count"], round(row["loss"], 9)


def test_sweep_builds_its_data_once_and_matches_each_checkpoint_alone(sweep, tmp_path, counted):
    rows = _eval(sweep, tmp_path, "sweep.csv")
    assert len(rows) == 4 and counted == {"datasets": 1, "iterations": 1}
    for row in rows:
        (alone,) = _eval(row["checkpoint"], tmp_path, "one.json")
        assert _metrics(alone) == _metrics(row), row["checkpoint"]
    assert counted == {"datasets": 1 + 4, "iterations": 1 + 4}  # alone: one call per checkpoint
    assert len({_metrics(r) for r in rows}) > 1  # the checkpoints differ, so equal rows are not a replay bug


def test_a_val_set_over_the_budget_is_read_again_for_each_checkpoint(sweep, tmp_path, counted):
    cfg = compose([f"checkpoint={sweep}", "trainer.device=cpu", "data.num_workers=0"], "eval")
    paths = checkpoints_in(sweep)
    over = SharedEvalData(budget=1)
    rows = [evaluate_checkpoint(p, cfg, distributed.DistInfo(), over) for p in paths]
    assert counted == {"datasets": 1, "iterations": len(paths)}
    shared = SharedEvalData()
    again = [evaluate_checkpoint(p, cfg, distributed.DistInfo(), shared) for p in paths]
    assert [_metrics(r) for r in rows] == [_metrics(r) for r in again]
    assert counted == {"datasets": 2, "iterations": len(paths) + 1}
