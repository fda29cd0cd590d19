"""Rank-0 logging: activation histograms, Meta-ACON β statistics, metrics.jsonl."""

from __future__ import annotations

import json

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import models
from acon import MetaAconC
from acon.logging import RunLogger


def test_meta_acon_beta_statistics_and_histograms(tmp_path):
    torch.manual_seed(0)
    model = models.create_model("shufflenetv2_x0_5", activation="meta_acon", num_classes=3, small_input=True)
    logger = RunLogger(tmp_path, enabled=True, history=[{"epoch": 1, "val_top1_err": 50.0}])
    logger.activation_histograms(model, step=3)
    logger.meta_beta_stats(model, torch.randn(4, 3, 16, 16), step=3)
    logger.epoch_line({"epoch": 2, "val_top1_err": 40.0})
    logger.close()
    assert model.training  # the β probe ran in eval mode and restored the mode
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    hists, scalars = events.Tags()["histograms"], events.Tags()["scalars"]
    metas = [t for t in hists if t.startswith("meta_beta/")]
    assert len(metas) == sum(isinstance(m, MetaAconC) for m in model.modules()) > 0
    assert any(t.startswith("act/") and t.endswith(".p1") for t in hists)
    means = [events.Scalars(t)[0].value for t in scalars if t.startswith("meta_beta_mean/")]
    assert means and all(0.0 < v < 1.0 for v in means)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
