"""The training loop's edges: no device reads inside a step, exact non-finite stops between reads, a stop at
the final step, fractional epochs, validation every N steps, and one epoch numbering in every line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose
from recording import run_recording, small_shufflenet
from test_fault_data import messy_imagenet  # noqa: F401  (the folder with broken files)

import acon.trainer
from acon.checkpoint import load_checkpoint
from acon.tasks.classification import ClassificationTask

RUN = "r"
ACON = str(ROOT / "acon")


def small(root, out, *extra: str) -> list[str]:
    """ShuffleNetV2 0.5x (ReLU), 16 px, batch 4 on the tiny folder: 6 steps an epoch."""
    return small_shufflenet(root, out, f"run_name={RUN}", *extra)


def lines_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_train_step_never_reads_the_device(tiny_imagenet, tmp_path, monkeypatch):
    """No .item()/.tolist()/bool()/float() of a tensor and no synchronize from the suite's own code inside
    a step (torch.cuda.set_sync_debug_mode's check, emulated on the CPU); reads happen at log intervals."""
    inside, reads = [False], []

    def counting(name, real):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if inside[0] and caller.startswith(ACON):
                reads.append((name, caller, sys._getframe(1).f_lineno))
            return real(*args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counting("synchronize", torch.cuda.synchronize))
    real_step = acon.trainer.Trainer.train_step

    def step(self, *args, **kwargs):
        inside[0] = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(acon.trainer.Trainer, "train_step", step)
    results = run_recording(small(tiny_imagenet, tmp_path, "trainer.nan_policy=skip")).results
    assert results["steps"] == 6 and reads == [], reads  # before: loss.item(), the flags' .tolist()
    assert lines_of(tmp_path / RUN)[0]["train_loss"] > 0  # the loss sum still arrives


def _nan_at(monkeypatch, bad_calls: set[int]) -> None:
    real = ClassificationTask.loss
    calls = []

    def poisoned(self, ctx, images, targets):
        calls.append(len(calls))
        loss = real(self, ctx, images, targets)
        return loss * float("nan") if calls[-1] in bad_calls else loss

    monkeypatch.setattr(ClassificationTask, "loss", poisoned)


def test_nan_stop_between_reads_names_the_bad_step_and_saves_nothing_after_it(
    tiny_imagenet, tmp_path, monkeypatch
):
    """NaN at step 3, read at step 5 (log_every): the message names step 3, the checkpoint of step 2 is
    kept, nothing non-finite is saved, and train.log holds the stop reason too."""
    _nan_at(monkeypatch, {3})
    log = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(log)
    try:
        with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 3 \(epoch 0\.50\)"):
            run_recording(small(tiny_imagenet, tmp_path, "trainer.log_every=5", "trainer.ckpt_every_steps=2"))
    finally:
        logging.getLogger().removeHandler(log)
        log.close()
    state = load_checkpoint(tmp_path / RUN / "last.pt")
    assert state["progress"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "error: non-finite training loss at step 3" in (tmp_path / "train.log").read_text()


def test_nan_skip_undoes_the_update_on_the_device(tiny_imagenet, tmp_path, monkeypatch):
    """A skipped step changes no weight and no momentum: the run equals one that never saw that batch's
    update (the bad batch still advances the data and the schedule, as before)."""
    _nan_at(monkeypatch, {0, 3})
    run = run_recording(small(tiny_imagenet, tmp_path, "trainer.nan_policy=skip", "trainer.log_every=100"))
    assert run.results["nonfinite_steps_skipped"] == 2 and run.results["steps"] == 6
    state = load_checkpoint(tmp_path / RUN / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    momenta = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert momenta and all(torch.isfinite(m).all() for m in momenta)


@pytest.mark.parametrize("bad", [True, False])
def test_masked_update_restores_weights_and_optimizer_state_exactly(bad):
    """SGD with momentum and weight decay (a zero gradient would still move the weights): a flagged step
    leaves weights and momentum bit-identical, and a momentum buffer it created reads as a fresh one."""
    from acon.engine import StepContext, StepGuard

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ctx = StepContext(model, opt, None, torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"))

    def update():
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()

    flag = torch.tensor(bad)

    def step() -> torch.Tensor:
        update()
        return flag

    StepGuard.masked(ctx, step)  # creates the momentum buffers
    assert all(bool((opt.state[p]["momentum_buffer"] == 0).all()) == bad for p in model.parameters())
    update()
    before = [
        t.clone()
        for t in [*model.parameters(), *(opt.state[p]["momentum_buffer"] for p in model.parameters())]
    ]
    StepGuard.masked(ctx, step)
    after = [*model.parameters(), *(opt.state[p]["momentum_buffer"] for p in model.parameters())]
    assert all(torch.equal(a, b) == bad for a, b in zip(after, before, strict=True))


def test_stop_requested_at_the_final_step_still_validates_and_finishes(tiny_imagenet, tmp_path, monkeypatch):
    """An iteration recipe ending mid-epoch (8 steps, 6 an epoch); SIGTERM during the final step. Before:
    exit 75, and the rerun wrote status complete with epoch 1's metrics, never validating step 8."""
    real = ClassificationTask.loss
    calls = []

    def signalled(self, ctx, images, targets):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, ctx, images, targets)

    monkeypatch.setattr(ClassificationTask, "loss", signalled)
    results = run_recording(small(tiny_imagenet, tmp_path, "recipe.iterations=8")).results
    assert results["status"] == "complete" and results["steps"] == 8
    history = lines_of(tmp_path / RUN)
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 6), (1.3333, 8)]  # before: (1, 6), (1, 8)
    assert results["top1_err"] == history[-1]["val_top1_err"]
    assert results["best_epoch"] in (1, 1.3333)


def test_max_steps_summary_names_no_unwritten_best_and_one_epoch_numbering(
    tiny_imagenet, tmp_path, monkeypatch, capsys
):
    """Stopped at step 2 of a 6-step epoch: no best.pt exists, so the summary names none; the summary, the
    progress bar and the records count epochs the same way (0.33 = a third of the first epoch)."""
    monkeypatch.setattr("acon.console.show_progress_bar", lambda wanted: wanted)
    ov = [a for a in small(tiny_imagenet, tmp_path, "trainer.max_steps=2") if a != "trainer.progress=false"]
    run = run_recording(ov)
    assert run.results is None and not (tmp_path / RUN / "best.pt").exists()
    results = json.loads((tmp_path / RUN / "results.json").read_text())
    assert results["best_checkpoint"] is None and results["best_epoch"] == 0.3333
    text = [m for _, m in run.lines]
    assert not any("best.pt" in m for m in text), text  # before: "best: <run>/best.pt"
    assert any("best" in m and "at epoch 0.33," in m for m in text), text
    assert "epoch=0.33/1" in capsys.readouterr().err  # before: epoch=0 while in the first epoch


def test_val_every_steps_validates_mid_epoch_after_saving(tiny_imagenet, tmp_path, monkeypatch):
    """Validation every 2 steps of a 6-step epoch; last.pt is at the validated step before each
    validation starts; a run killed during a validation validates there again on the rerun."""
    saved_at, real = [], ClassificationTask.evaluate

    def evaluate(self, model, loader, cfg, info):
        saved_at.append(load_checkpoint(tmp_path / RUN / "last.pt")["progress"]["step"])
        if len(saved_at) == 2 and not killed:
            killed.append(1)
            raise KeyboardInterrupt  # the process dies during the validation at step 4
        return real(self, model, loader, cfg, info)

    killed: list[int] = []
    monkeypatch.setattr(ClassificationTask, "evaluate", evaluate)
    ov = small(tiny_imagenet, tmp_path, "trainer.val_every_steps=2", "trainer.ckpt_every_steps=1000")
    with pytest.raises(KeyboardInterrupt):
        run_recording(ov)
    assert saved_at == [2, 4] and load_checkpoint(tmp_path / RUN / "last.pt")["progress"]["step"] == 4
    rerun = run_recording(ov)
    results = rerun.results
    assert saved_at == [2, 4, 4, 6] and results["steps"] == 6
    resumed = [m for _, m in rerun.lines if "resuming from" in m]
    assert resumed and "at step 4 (epoch 0.67) of 6" in resumed[0], resumed  # before: (epoch 0, batch 4)
    history = lines_of(tmp_path / RUN)
    assert [(r["epoch"], r["step"]) for r in history] == [(0.3333, 2), (0.6667, 4), (1, 6)]
    assert all("val_top1_err" in r for r in history)
    assert results["best_epoch"] in (0.3333, 0.6667, 1)


def test_iteration_recipes_validate_every_n_steps():
    """The COCO and Cityscapes experiments validate every N steps, not at each of their ~12-200 epochs."""
    for name, every in (
        ("detection/fasterrcnn_resnet50_relu", 7500),
        ("segmentation/deeplabv3_cityscapes_resnet50_relu", 8000),
    ):
        cfg = compose([f"experiment={name}", "backbone.checkpoint=null"])
        assert cfg.trainer.val_every_steps == every, name


def test_sigterm_line_says_rerun_outside_slurm_and_requeued_under_slurm(monkeypatch, tmp_path, capsys):
    from acon.preempt import requeue_and_exit

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(SystemExit) as stop:
        requeue_and_exit("received SIGTERM", True, "SIGTERM")
    assert stop.value.code == 75
    assert (
        "exiting with status 75 (rerun the same command to resume)" in capsys.readouterr().err
    )  # before: (requeue)
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "asked"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(SystemExit):
        requeue_and_exit("received SIGTERM", True, "SIGTERM")
    assert "exiting with status 75 (requeued SLURM job 42)" in capsys.readouterr().err
    assert (tmp_path / "asked").read_text().split() == ["requeue", "42"]
    # scontrol refuses (a job not requeueable, a controller down): said so, not "requeued"
    scontrol.write_text('#!/bin/sh\necho "scontrol: error: Requested operation is disabled" >&2\nexit 1\n')
    with pytest.raises(SystemExit):
        requeue_and_exit("received SIGTERM", True, "SIGTERM")
    err = capsys.readouterr().err
    assert "could not requeue SLURM job 42: scontrol requeue: scontrol: error: Requested operation" in err
    assert "exiting with status 75 (rerun the same command to resume)" in err and "requeued" not in err


# `scontrol show job -o N` as Slurm 22.05 printed it in a job's SIGTERM handler (fields cut to those read)
SCANCELLED = "JobId=42 JobName=train JobState=COMPLETING Reason=None Requeue=1 Restarts=0 PreemptTime=None"
SHOW_JOB = {
    "scancel": (SCANCELLED, False),
    "time limit": (SCANCELLED.replace("Reason=None", "Reason=TimeLimit"), True),
    "preempted": (SCANCELLED.replace("PreemptTime=None", "PreemptTime=2026-12-07T14:53:45"), True),
    "scancel --signal": (SCANCELLED.replace("COMPLETING", "RUNNING"), True),
    "no scontrol show": ("", True),
}


@pytest.mark.parametrize("case", SHOW_JOB)
def test_a_cancelled_slurm_job_is_not_requeued(monkeypatch, tmp_path, capsys, case):
    """scancel sends SIGTERM, and `scontrol requeue` requeues even a cancelled job (Slurm 22.05, seen on a
    real cluster): before, a cancelled run came back two minutes later. Only a cancel skips the requeue."""
    from acon.preempt import requeue_and_exit

    show, requeue = SHOW_JOB[case]
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path / "asked"}\n[ "$1" = show ] && echo "{show}"\nexit 0\n'
    )
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(SystemExit) as stop:
        requeue_and_exit("received SIGTERM", True, "SIGTERM")
    err = capsys.readouterr().err
    asked = (tmp_path / "asked").read_text().splitlines()
    assert stop.value.code == 75 and asked[0] == "show job -o 42"
    if requeue:
        assert asked[1:] == ["requeue 42"] and "exiting with status 75 (requeued SLURM job 42)" in err
    else:
        assert asked[1:] == [] and "(requeued SLURM" not in err
        assert "(SLURM job 42 was cancelled, so it is not requeued; rerun the same command to resume)" in err


def test_a_slow_scontrol_show_job_does_not_hold_the_requeue(monkeypatch, tmp_path, capsys):
    """A controller that does not answer `scontrol show job` within SHOW_JOB_TIMEOUT_S: not taken for a
    cancel, so the job is still requeued, before SLURM's KillWait (30 s) ends the process."""
    from acon import preempt

    monkeypatch.setattr(preempt, "SHOW_JOB_TIMEOUT_S", 0.5)
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\n[ "$1" = show ] && exec sleep 20\necho "$@" >> {tmp_path / "asked"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    t0 = time.monotonic()
    with pytest.raises(SystemExit):
        preempt.requeue_and_exit("received SIGTERM", True, "SIGTERM")
    assert time.monotonic() - t0 < 15  # did not wait for the 20 s answer
    assert (tmp_path / "asked").read_text().split() == ["requeue", "42"]
    assert "exiting with status 75 (requeued SLURM job 42)" in capsys.readouterr().err


def test_bad_image_budget_stop_is_written_to_the_log_file(messy_imagenet, tmp_path):  # noqa: F811
    """The budget's error line reaches train.log, not only the console (before: console only)."""
    from acon.data.bad_images import BadImageError

    log = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(log)
    try:
        with pytest.warns(UserWarning, match="skipping bad image"), pytest.raises(BadImageError):
            run_recording(small(messy_imagenet, tmp_path, "data.bad_image_policy=skip"))
    finally:
        logging.getLogger().removeHandler(log)
        log.close()
    assert (
        "error: 2 bad images in the train split, more than the default"
        in (tmp_path / "train.log").read_text()
    )


def _bn_net(scaler: torch.amp.GradScaler):
    """(model, step) for a conv → BatchNorm net; ``step(x, n, poison)`` runs the forward, the flag and the
    update under :meth:`StepGuard.masked`, with a NaN in the input (the forward goes non-finite, not only
    the loss) when ``poison``; returns the flag."""
    from acon.engine import StepContext, StepGuard, optimizer_step

    class NoSchedule:
        def step_update(self, step: int) -> None:
            pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx = StepContext(model, opt, NoSchedule(), scaler, None, torch.device("cpu"), raw_model=model)
    guard = StepGuard(torch.device("cpu"))

    def step(x: torch.Tensor, n: int, poison: bool) -> bool:
        def one() -> torch.Tensor:
            loss = model(x * float("nan") if poison else x).pow(2).mean()
            bad = guard.observe(loss, n)
            optimizer_step(ctx, loss, n)
            return bad

        return bool(StepGuard.masked(ctx, one))

    return model, step


def test_a_skipped_nan_forward_leaves_batchnorm_statistics_as_they_were():
    """The forward moves the running statistics before the loss is known: a skipped step puts them back
    (before, running_mean/var kept the NaN and the next save was refused)."""
    model, step = _bn_net(torch.amp.GradScaler("cpu", enabled=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert step(torch.randn(8, 3, 2, 2), 0, poison=True)
    after = model.state_dict()
    assert [k for k, v in before.items() if not torch.equal(after[k], v)] == []


def test_a_skipped_first_step_leaves_the_gradscaler_at_its_initial_scale():
    """fp16's GradScaler creates its scale at the first step of a process (after a resume too): a skipped
    first step left it at 0, which zeroed every later gradient and unscaled them to NaN weights."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model, step = _bn_net(scaler)
    assert step(torch.randn(8, 3, 2, 2), 0, poison=True)
    assert scaler.get_scale() == 1024.0
    weights = [p.detach().clone() for p in model.parameters()]
    assert not step(torch.randn(8, 3, 2, 2), 1, poison=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
