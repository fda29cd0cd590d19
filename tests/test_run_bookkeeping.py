"""Run-dir bookkeeping: the validation schedule, a restart in an existing run dir, a resume into a new one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import compose, load_script, tiny_overrides

from acon.checkpoint import load_checkpoint
from acon.tables import find_run_dirs
from acon.trainer import train
from acon.validate import ConfigError, check_train_config

RUN = "r"


def overrides(root: Path, out: Path, *extra: str) -> list[str]:
    """3 epochs of 3 steps, validating every 2 epochs; scalars at every step, a step_<n>.pt at every save."""
    return tiny_overrides(root, out) + [
        "recipe.batch_size=8",
        "recipe.base_batch_size=8",
        "model=shufflenetv2_x0_5_small",
        "activation=relu",
        "recipe.epochs=3",
        "trainer.val_every_epochs=2",
        "trainer.log_every=1",
        "trainer.ckpt_every_steps=1000",
        "trainer.keep_step_checkpoints=5",
        f"run_name={RUN}",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(tiny_imagenet, tmp_path_factory, one_thread) -> Path:
    """The run dir of a complete run (trained in this process)."""
    out = tmp_path_factory.mktemp("finished")
    train(compose(overrides(tiny_imagenet, out)))
    return out / RUN


def scalar_steps(tb: Path, tag: str) -> list[int]:
    """The steps at which ``tag`` was logged in the event files of ``tb``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.step for e in EventAccumulator(str(tb)).Reload().Scalars(tag)]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def copy_run(src: Path, out: Path) -> Path:
    return Path(shutil.copytree(src, out / RUN))


def test_val_every_epochs_validates_on_its_schedule_and_at_the_end(finished):
    records = history(finished)
    assert [r["epoch"] for r in records] == [1, 2, 3] and all("train_loss" in r for r in records)
    assert ["val_top1_err" in r for r in records] == [False, True, True]
    assert scalar_steps(finished / "tb", "val/top1_err") == [6, 9]
    assert load_checkpoint(finished / "best.pt")["progress"]["step"] in (6, 9)
    # last.pt is still written at every epoch end (a step_<n>.pt copy of each save)
    assert sorted(p.name for p in finished.glob("step_*.pt")) == ["step_3.pt", "step_6.pt", "step_9.pt"]
    results = json.loads((finished / "results.json").read_text())
    assert results["top1_err"] == records[-1]["val_top1_err"]


def test_val_every_epochs_below_one_is_refused(tiny_imagenet, tmp_path):
    cfg = compose(overrides(tiny_imagenet, tmp_path, "trainer.val_every_epochs=0"))
    with pytest.raises(ConfigError, match="trainer.val_every_epochs=0"):
        check_train_config(cfg, 1)


def test_noop_rerun_of_a_finished_run_adds_no_event_file(tiny_imagenet, finished, tmp_path, one_thread):
    run = copy_run(finished, tmp_path)
    events = sorted(p.name for p in (run / "tb").iterdir())
    before = json.loads((run / "results.json").read_text())
    train(compose(overrides(tiny_imagenet, tmp_path)))
    assert sorted(p.name for p in (run / "tb").iterdir()) == events
    after = json.loads((run / "results.json").read_text())
    assert after["status"] == "complete" and after["steps"] == 9 and after["top1_err"] == before["top1_err"]
    assert after["wall_time_s"] == before["wall_time_s"] > 0  # the run's segments; this process trained none


def test_resume_none_sets_the_previous_run_aside(tiny_imagenet, finished, tmp_path, one_thread):
    run = copy_run(finished, tmp_path)
    old_events = sorted(p.name for p in (run / "tb").iterdir())
    assert train(compose(overrides(tiny_imagenet, tmp_path, "resume=none", "trainer.max_steps=2"))) is None
    new_events = [p.name for p in (run / "tb").iterdir()]
    assert len(new_events) == 1 and new_events[0] not in old_events
    assert scalar_steps(run / "tb", "train/loss") == [1, 2]  # the new curve alone, no old points
    (previous,) = run.glob("previous-*")
    assert sorted(p.name for p in (previous / "tb").iterdir()) == old_events
    old_results = json.loads((previous / "results.json").read_text())
    new_results = json.loads((run / "results.json").read_text())  # written by the max_steps stop
    assert old_results["status"] == "complete" and old_results["steps"] == 9
    assert new_results["status"] == "stopped at max_steps" and new_results["steps"] == 2
    assert len(history(previous)) == 3
    assert [(r["step"], r.get("stopped_at_max_steps")) for r in history(run)] == [(2, True)]
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == 2
    assert find_run_dirs([tmp_path]) == [run]  # results tables do not count the set-aside run


def test_resume_of_a_finished_checkpoint_into_a_new_run_dir_writes_last_and_best(
    tiny_imagenet, finished, tmp_path, one_thread
):
    results = train(
        compose(overrides(tiny_imagenet, tmp_path, f"resume={finished / 'last.pt'}", "run_name=new"))
    )
    new = tmp_path / "new"
    assert results["status"] == "complete" and (new / "results.json").is_file()
    assert load_checkpoint(new / "last.pt")["progress"]["step"] == 9
    best = load_checkpoint(finished / "best.pt")["progress"]
    assert load_checkpoint(new / "best.pt")["progress"]["step"] == best["step"] == best["best"]["step"]


def test_curves_plot_only_the_validated_epochs(finished):
    plot_curves = load_script("plot_curves")
    assert sorted(plot_curves.read_curve(finished)) == [2, 3]
