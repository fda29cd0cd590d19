"""Non-finite losses: stop with a clear message keeping the last good checkpoint, or skip and count."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import compose, run_cli, tiny_overrides

import acon.trainer
from acon.checkpoint import CheckpointError, assert_finite, load_checkpoint
from acon.tasks.classification import ClassificationTask

RUN = "r"


def _nan_at(monkeypatch, bad_calls: set[int]) -> list[int]:
    """Make the task's training loss NaN on the given (0-based) training calls; returns the call log."""
    real, calls = ClassificationTask.loss, []

    def poisoned(self, ctx, images, targets):
        loss = real(self, ctx, images, targets)
        calls.append(len(calls))
        return loss * float("nan") if calls[-1] in bad_calls else loss

    monkeypatch.setattr(ClassificationTask, "loss", poisoned)
    return calls


def _cfg(root, out, *extra):
    base = ["model=resnet18_small", "activation=relu", f"run_name={RUN}", "trainer.ckpt_every_steps=1"]
    return compose(tiny_overrides(root, out) + base + list(extra))


def test_nan_stop_keeps_last_good_checkpoint(tiny_imagenet, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3})
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 3 .*last\.pt"):
        acon.trainer.train(_cfg(tiny_imagenet, tmp_path, "trainer.nan_policy=stop"))
    state = load_checkpoint(tmp_path / RUN / "last.pt")
    assert state["progress"]["step"] == 3  # the state right before the poisoned step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_skip_skips_and_counts(tiny_imagenet, tmp_path, monkeypatch):
    calls = _nan_at(monkeypatch, {1, 4})
    results = acon.trainer.train(_cfg(tiny_imagenet, tmp_path, "trainer.nan_policy=skip"))
    assert len(calls) == 6 and results["nonfinite_steps_skipped"] == 2 and results["steps"] == 6
    state = load_checkpoint(tmp_path / RUN / "last.pt")
    assert state["progress"]["nonfinite_steps_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_skip_of_a_nan_forward_keeps_batchnorm_statistics(tiny_imagenet, tmp_path, monkeypatch):
    """A NaN in the forward itself (an overflow, say), not only in the loss: the BatchNorm running
    statistics it moved are put back, so the run completes and saves (before: NaN statistics, and the
    next save was refused)."""
    real, calls = ClassificationTask.loss, []

    def nan_images(self, ctx, images, targets):
        calls.append(len(calls))
        return real(self, ctx, images * float("nan") if calls[-1] == 1 else images, targets)

    monkeypatch.setattr(ClassificationTask, "loss", nan_images)
    results = acon.trainer.train(_cfg(tiny_imagenet, tmp_path, "trainer.nan_policy=skip"))
    assert results["nonfinite_steps_skipped"] == 1 and results["steps"] == 6
    state = load_checkpoint(tmp_path / RUN / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    assert_finite(model)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="weight holds NaN/Inf"):
        assert_finite(model)


@pytest.mark.slow  # long; run with -m slow
def test_exploding_lr_stops_cli_with_clear_message(tiny_imagenet, tmp_path):
    """A real divergence (lr=1e30): exit status 3, one error line, last.pt finite or never written."""
    proc = run_cli(
        [
            sys.executable,
            "train.py",
            *tiny_overrides(tiny_imagenet, tmp_path),
            "model=resnet18_small",
            "activation=relu",
            f"run_name={RUN}",
            "trainer.ckpt_every_steps=1",
            "recipe.lr=1e30",
        ],
        check=False,
        timeout=180,
    )
    assert proc.returncode in (2, 3), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "non-finite training loss" in proc.stderr or "refusing to save a checkpoint" in proc.stderr
    last = tmp_path / RUN / "last.pt"
    if last.exists():
        state = load_checkpoint(last)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        assert not (tmp_path / RUN / "results.json").exists()
