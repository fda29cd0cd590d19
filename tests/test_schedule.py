"""The run's length and LR schedule: the authors' per-step lr, batch-size scaling, warnings, description."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from conftest import compose
from recording import run_recording, small_shufflenet

from acon.optim import build_scheduler, describe_schedule, log_schedule, step_lrs, total_steps

small = small_shufflenet


@pytest.fixture(scope="module")
def half_batch_run(tiny_imagenet, tmp_path_factory):
    """3 iterations at base batch 8, trained at batch 4 (24 training images: 6 batches per epoch)."""
    out = tmp_path_factory.mktemp("half_batch")
    return run_recording(
        small(
            tiny_imagenet,
            out,
            "recipe.batch_size=4",
            "recipe.base_batch_size=8",
            "recipe.iterations=3",
            "recipe.lr=0.1",
        )
    )


def test_lr_of_first_and_last_step_match_the_authors(half_batch_run):
    """The authors step LambdaLR(1 - t/T) before each update: step 1 at lr(1 - 1/T), the last at 0."""
    lrs = half_batch_run.lrs
    base, steps = 0.1 * 4 / 8, 6
    model = torch.nn.Linear(1, 1)
    theirs = torch.optim.SGD(model.parameters(), lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(theirs, lambda t: (1.0 - t / steps) if t <= steps else 0)
    expected = []
    for _ in range(steps):
        with warnings.catch_warnings():  # torch warns about their order (scheduler first); it is the point
            warnings.simplefilter("ignore")
            sched.step()
        expected.append(theirs.param_groups[0]["lr"])
        theirs.step()
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[0] == pytest.approx(base * (1 - 1 / steps)) and lrs[-1] == 0.0


def test_other_batch_size_keeps_the_epochs(half_batch_run):
    """recipe.iterations count at base_batch_size: half the batch, twice the steps, same epochs."""
    results, lrs, lines = half_batch_run.results, half_batch_run.lrs, half_batch_run.lines
    assert results["steps"] == len(lrs) == 6 and results["epochs"] == 1
    banner = [m for _, m in lines if m.startswith("schedule:")]
    assert len(banner) == 1 and "6 steps = 1.0 epochs at global batch 4" in banner[0], banner
    assert "(3 iterations at base batch 8)" in banner[0] and "step 6 at 0" in banner[0]
    for recipe, batch, steps in (("shufflenetv2", 512, 600_000), ("resnet", 1024, 150_000)):
        cfg = compose([f"recipe={recipe}", f"recipe.batch_size={batch}"]).recipe
        assert total_steps(cfg, batches_per_epoch=1) == steps
        epochs = 1_281_167 // batch
        line = describe_schedule(cfg, steps, epochs)
        assert f"{steps} steps = {steps / epochs:.1f} epochs at global batch {batch}" in line, line


def test_warmup_longer_than_the_run_warns(caplog):
    """The digits recipe's 66 warm-up steps on a 2-epoch run (44 steps) say so, and the banner shows it."""
    recipe = compose(["recipe.epochs=2"]).recipe
    with caplog.at_level(logging.INFO, logger="acon.optim"):
        line = log_schedule(recipe, total_steps(recipe, batches_per_epoch=22), batches_per_epoch=22)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "recipe.warmup_steps=66 is not shorter than the run (44 steps)" in warned[0]
    assert "44 steps = 2.0 epochs" in line and "warm-up 66 steps from lr 0.01 to 0.1" in line
    lrs = step_lrs(recipe, 44, list(range(1, 45)))
    assert lrs == sorted(lrs) and lrs[-1] < 0.1  # rising to the end, as the warning says
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="acon.optim"):
        log_schedule(recipe, 308, 22)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_single_step_linear_schedule_has_no_timm_warning(caplog):
    recipe = compose(["recipe.iterations=1", "recipe.warmup_steps=0"]).recipe
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with caplog.at_level(logging.WARNING):
        build_scheduler(probe, recipe, total_steps(recipe, 22))
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_warmup_starting_above_a_batch_scaled_lr_warns(caplog):
    """warmup_lr is absolute while the lr scales with the batch: the digits recipe at batch 4 would warm up
    from 0.01 down to 0.00625."""
    recipe = compose(["recipe.batch_size=4"]).recipe
    with caplog.at_level(logging.INFO, logger="acon.optim"):
        log_schedule(recipe, 5000, 350)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "recipe.warmup_lr=0.01 is above the run's lr 0.00625 (0.1 × 4/64): the warm-up lowers the lr instead "
        "of raising it; set recipe.warmup_lr=0.000625 (the recipe's ratio to its lr) or lower"
    ]
    lrs = step_lrs(recipe, 5000, [1, 66])
    assert lrs[0] > lrs[1]  # falling, as the warning says
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="acon.optim"):
        log_schedule(compose(["recipe.batch_size=4", "recipe.warmup_lr=0.000625"]).recipe, 5000, 350)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
