"""What a run leaves at its end: max_steps validation and results.json; histograms every epoch and at the end."""

from __future__ import annotations

import json

import torch
from conftest import compose, tiny_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import models
from acon.logging import RunLogger
from acon.trainer import train


def histogram_steps(run_dir, prefix: str) -> dict[str, list[int]]:
    """{tag: steps} of the histograms (and Meta-ACON β means) in the run's real TensorBoard files."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    out = {t: [e.step for e in events.Histograms(t)] for t in tags["histograms"] if t.startswith(prefix)}
    out |= {t: [e.step for e in events.Scalars(t)] for t in tags["scalars"] if t.startswith(prefix)}
    return out


def test_max_steps_validates_once_and_histograms_close_every_epoch(tiny_imagenet, tmp_path):
    """2 epochs of 3 steps, stopped at step 4 (mid-epoch 2), then rerun to the end."""
    ov = tiny_overrides(tiny_imagenet, tmp_path) + [
        "model=shufflenetv2_x0_5_small",
        "activation=meta_acon",
        "run_name=r",
        "recipe.epochs=2",
        "recipe.batch_size=8",
        "recipe.base_batch_size=8",
        "trainer.threads=1",
        "trainer.hist_every=1000",
        "data.img_size=16",
        "data.val_transform.resize=18",
    ]
    run_dir = tmp_path / "r"
    assert train(compose([*ov, "trainer.max_steps=4"])) is None  # stopped early
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("stopped_at_max_steps", False)) for r in lines] == [(3, False), (4, True)]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "stopped at max_steps" and results["steps"] == 4 and results["epochs"] == 1
    assert results["top1_err"] == lines[-1]["val_top1_err"] and lines[-1]["val_count"] == 9
    hists = histogram_steps(run_dir, "act/")
    assert hists and all(steps == [3, 4] for steps in hists.values()), hists
    metas = histogram_steps(run_dir, "meta_beta")
    assert metas and all(steps == [3, 4] for steps in metas.values()), metas

    first = (run_dir / "last.pt").read_bytes()
    assert train(compose([*ov, "trainer.max_steps=4"])) is None  # the same command again trains no step
    assert (run_dir / "last.pt").read_bytes() == first
    again = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("stopped_at_max_steps", False)) for r in again] == [(3, False), (4, True)]
    assert again[-1]["val_top1_err"] == lines[-1]["val_top1_err"]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 4

    final = train(compose(ov))  # resumes at step 4 and finishes epoch 2
    assert final["status"] == "complete" and final["steps"] == 6
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]  # the max_steps line is not part of the run's history
    hists = histogram_steps(run_dir, "act/")
    assert hists and all(steps[0] == 3 and steps[-1] == 6 for steps in hists.values()), hists


def test_histograms_of_non_finite_values_do_not_stop_the_run(tmp_path):
    """A 2-step run at a large lr can give NaN β in eval mode; the end-of-run histograms must cope."""
    model = models.create_model("shufflenetv2_x0_5", activation="meta_acon", num_classes=3, small_input=True)
    first = next(m for m in model.modules() if hasattr(m, "p1"))
    with torch.no_grad():
        first.p1.view(-1)[0] = float("nan")
    logger = RunLogger(tmp_path, enabled=True)
    logger.activation_histograms(model, step=1)
    logger.meta_beta_stats(model, torch.full((2, 3, 16, 16), float("nan")), step=1)  # every β is NaN
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    hists = events.Tags()["histograms"]
    assert not [t for t in hists if t.startswith("meta_beta/")]  # nothing finite to bin
    p1 = [t for t in hists if t.endswith(".p1")]
    assert p1 and all(events.Histograms(t)[0].histogram_value.num > 0 for t in p1)
