"""resume_mode=extend|finetune: continue a checkpoint with a longer schedule, or fine-tune its weights."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf
from recording import run_recording, small_shufflenet, weights_norm

from acon.builders import build_model
from acon.checkpoint import CheckpointError, load_checkpoint
from acon.validate import ConfigError


def small(root, out, *extra: str) -> list[str]:
    """ShuffleNetV2 0.5x (ReLU) on the tiny JPEG folder at batch 8: 3 steps per epoch."""
    return small_shufflenet(root, out, "recipe.batch_size=8", "recipe.base_batch_size=8", *extra)


@pytest.fixture(scope="module")
def finished(tiny_imagenet, tmp_path_factory):
    """A finished 1-epoch run, and a copy of its last.pt elsewhere (as a user would keep it)."""
    out = tmp_path_factory.mktemp("runs")
    run_recording(small(tiny_imagenet, out, "run_name=short"))
    copy = out / "kept.pt"
    shutil.copyfile(out / "short" / "last.pt", copy)
    return out, copy


def test_extend_a_finished_run_with_a_longer_schedule(tiny_imagenet, finished):
    out, copy = finished
    longer = small(tiny_imagenet, out, f"resume={copy}", "run_name=longer", "recipe.epochs=2")
    with pytest.raises(CheckpointError, match="recipe.epochs differs from this run.*resume_mode=extend"):
        run_recording(longer)  # refused without the flag, as before
    assert not (out / "longer").exists()
    with pytest.raises(ConfigError, match=r"recipe.lr differs from .*resume_mode=finetune"):
        run_recording([*longer, "resume_mode=extend", "recipe.lr=0.05"])
    with pytest.raises(ConfigError, match="needs a longer schedule"):
        run_recording([*longer, "resume_mode=extend", "recipe.epochs=1"])

    run = run_recording([*longer, "resume_mode=extend"])
    res = run.results
    assert res["steps"] == 6 and res["epochs"] == 2 and len(run.lrs) == 3
    assert run.first.state_size > 0  # the optimiser's momentum came with the checkpoint
    assert run.lrs == pytest.approx([0.1 * (1 - k / 6) for k in (4, 5, 6)])  # the schedule for 6 steps
    assert res["origin"] == {"resume_mode": "extend", "checkpoint": str(copy), "step": 3}
    assert res["identity"]["resume_mode"] == "extend" and res["identity"]["recipe"]["epochs"] == 2
    history = [json.loads(x) for x in (out / "longer" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert load_checkpoint(out / "longer" / "last.pt")["progress"]["origin"] == res["origin"]

    again = run_recording([*longer, "resume_mode=extend"])  # a requeue: its own last.pt, nothing redone
    assert again.lrs == [] and again.results["steps"] == 6 and again.results["origin"] == res["origin"]
    with pytest.raises(CheckpointError, match="resume_mode"):  # its checkpoints carry the mode
        run_recording(small(tiny_imagenet, out, "run_name=longer", "recipe.epochs=2"))


def test_finetune_starts_from_the_weights_only(tiny_imagenet, finished):
    out, copy = finished
    ft = small(tiny_imagenet, out, f"resume={copy}", "run_name=ft", "resume_mode=finetune", "recipe.lr=0.01")
    with pytest.raises(ConfigError, match="another activation"):
        run_recording([*ft, "activation=swish"])
    run = run_recording(ft)
    source = load_checkpoint(copy)
    cfg = OmegaConf.create(source["config"])
    model = build_model(cfg.model, cfg.activation, int(cfg.data.num_classes))
    model.load_state_dict(source["model"])
    assert run.first.norm == pytest.approx(weights_norm(model.parameters()), rel=1e-12)  # its weights
    assert run.first.state_size == 0  # a fresh optimiser (no momentum)
    res = run.results
    assert res["steps"] == 3 and len(run.lrs) == 3 and run.lrs[0] == pytest.approx(0.01 * (1 - 1 / 3))
    assert res["origin"] == {"resume_mode": "finetune", "checkpoint": str(copy), "step": 3}
    assert res["identity"]["resume_mode"] == "finetune" and res["identity"]["recipe"]["lr"] == 0.01
    assert len((out / "ft" / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_mode_without_a_checkpoint_is_refused(tiny_imagenet, tmp_path):
    with pytest.raises(ConfigError, match="resume_mode=extend needs a checkpoint to start from"):
        run_recording(small(tiny_imagenet, tmp_path, "resume_mode=extend"))
    with pytest.raises(ConfigError, match="resume_mode=finetune needs a checkpoint.*resume=none"):
        run_recording(small(tiny_imagenet, tmp_path, "resume_mode=finetune", "resume=none"))
    assert not list(tmp_path.rglob("*.pt"))


def test_identity_difference_reads_as_a_sentence():
    from acon.rundir import keys_differ

    assert keys_differ(["recipe.lr"]) == "recipe.lr differs"
    assert keys_differ(["model", "recipe.lr"]) == "model, recipe.lr differ"
